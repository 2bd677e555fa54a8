"""Rebuilding refcounts from the metadata (the repair half of qemu's
qcow2-refcount.c).

``reference_counts`` computes, vectorised with numpy, the refcount every
host cluster should have from the header, the L1/L2 tables (active and of
every snapshot) and the snapshot table; ``rebuild_refcounts`` makes the
stored refcounts and COPIED flags agree with it, refcount structures
included, in place.  It is how a dirty image (lazy refcounts after a
crash) is repaired at an open for writing (``check -r all`` lays out new
structures as qemu does: :mod:`qcow2fast.fsck.new_structures`).  L2
entries pointing past the end of the file are made zero clusters first
(:mod:`qcow2fast.fsck.past_eof`).
"""

import numpy as np

from .._ext.kernels import tally_add
from ..errors import CorruptImageError, LimitExceededError, RepairError
from ..spec.constants import L1E_SIZE, QCOW_OFLAG_COPIED
from ..spec.entries import (at_host0, decode_table, has_copied, host_offsets, is_compressed,
                            l2_table_offsets, standard_allocated)
from ..engine.crypto import header_ranges as crypto_header_ranges
from ..engine.bitmap_list import referenced_ranges
from .l1_tables import l1_tables, l2_tables
from .past_eof import drop_entries_past_eof

# Where the tally kernel (uint32 counts) saturates.
TALLY_MAX = int(np.iinfo(np.uint32).max)


class RefcountTally:
    """Expected refcounts, one uint32 per host cluster (saturating at
    TALLY_MAX: no real image has a cluster with 4 billion references).

    With ``grow`` (qemu-img check: count whatever the metadata says, like
    qemu's growing refcount array) the array grows to cover every
    reference; otherwise references at or past ``limit`` are recorded in
    ``outside`` (a rebuild refuses them)."""

    def __init__(self, limit, *, grow=False):
        self.counts = np.zeros(max(limit, 1), dtype=np.uint32)
        self.grow = grow
        self.outside = []           # (host cluster, what referenced it)

    def _inside(self, clusters, what):
        """Which of ``clusters`` the array covers (grown to cover them all
        with ``grow``; the others recorded in ``outside``): a slice, or a
        mask."""
        top = int(clusters.max()) + 1
        keep = slice(None)
        if top > len(self.counts):
            if self.grow:
                grown = np.zeros(max(top, 2 * len(self.counts)), dtype=np.uint32)
                grown[:len(self.counts)] = self.counts
                self.counts = grown
            else:
                keep = clusters < len(self.counts)
                self.outside.extend((int(c), what) for c in clusters[~keep][:16])
        return keep

    def add(self, clusters, what=None):
        clusters = np.asarray(clusters, dtype=np.int64).ravel()
        if len(clusters):
            keep = self._inside(clusters, what)
            tally_add(self.counts, np.ascontiguousarray(clusters[keep]))

    def add_range(self, first, n, what=None):
        self.add(np.arange(first, first + n), what)

    def add_weighted(self, clusters, weights, what=None):
        """counts[c] += w (saturating) for each cluster c of weight w."""
        if np.ndim(weights) == 0 and int(weights) == 1:
            return self.add(clusters, what)         # (the kernel: the common case)
        clusters = np.asarray(clusters, dtype=np.int64).ravel()
        if not len(clusters):
            return
        weights = np.broadcast_to(np.asarray(weights, dtype=np.uint64), clusters.shape)
        keep = self._inside(clusters, what)
        u, inv = np.unique(clusters[keep], return_inverse=True)
        total = np.zeros(len(u), dtype=np.uint64)
        np.add.at(total, inv, weights[keep])
        total += self.counts[u]
        self.counts[u] = np.minimum(total, np.uint64(TALLY_MAX)).astype(np.uint32)


def _compressed_spans(geo, entries):
    """(first, last) host cluster of each compressed descriptor in ``entries``
    (a numpy uint64 array), and the extents' byte ends."""
    coff, csize = geo.compressed_extent(entries)
    end = coff + csize
    cb = np.uint64(geo.cluster_bits)
    return coff >> cb, (end - np.uint64(1)) >> cb, end


def _tally_l2_entries(tally, geo, entries, what=None, weight=1):
    """Count the host clusters that L2 ``entries`` (numpy uint64) use,
    ``weight`` times (the references to their table)."""
    compressed = is_compressed(entries)
    std = host_offsets(entries[standard_allocated(entries)])
    tally.add_weighted(std >> np.uint64(geo.cluster_bits), weight, what)
    comp = entries[compressed]
    if len(comp):
        first, last, _ = _compressed_spans(geo, comp)
        for k in range(3):      # a compressed cluster spans at most 3 host clusters
            sel = first + np.uint64(k) <= last
            tally.add_weighted(first[sel] + np.uint64(k), weight, what)


def tally_mapping(img, tally):
    """Count header, L1/L2 tables, data clusters and snapshots (everything but
    the refcount structures); each table read once (fsck/l1_tables.py)."""
    geo, h, f = img.geo, img.header, img.file
    cs, cb = geo.cluster_size, geo.cluster_bits
    file_size = f.size()
    tally.add([0], "header")
    tables = l1_tables(img)
    if h.nb_snapshots:
        tally.add_range(h.snapshots_offset >> cb, geo.size_to_clusters(img.snapshot_table_bytes),
                        "snapshot table")
    for what, off, l1, weight in tables:
        if len(l1):
            first = off >> cb
            tally.add_weighted(np.arange(first, first + geo.size_to_clusters(len(l1) * L1E_SIZE)),
                               weight, what)
    l2offs, weights = l2_tables(tables)
    tally.add_weighted(l2offs >> np.uint64(cb), weights, "L2 table")
    if img.state.external_data:         # data clusters: in the data file, no refcounts
        return
    for l2off, weight in zip(l2offs.tolist(), weights.tolist()):
        if l2off + cs > file_size:
            continue
        entries = decode_table(f.pread(l2off, cs))
        _tally_l2_entries(tally, geo, entries[::geo.l2_entry_words], f"L2 table at {l2off:#x}",
                          weight)


def tally_bitmaps(img, tally):
    """Count the bitmap directory, tables and data clusters.  A rebuild
    would free what it cannot count: a broken extension stops it."""
    ranges, broken = referenced_ranges(img.file, img.header, img.size)
    if broken:
        raise RepairError("cannot rebuild the refcounts: the bitmaps extension cannot be "
                          "read (remove the broken bitmap or the extension first)")
    cb = img.geo.cluster_bits
    for off, n, what in ranges + crypto_header_ranges(img.header):
        tally.add(np.arange(off >> cb, ((off + max(n, 1) - 1) >> cb) + 1), what)


def tally_refcount_structures(img, tally):
    rc, geo = img.refcounts, img.geo
    h = img.header
    tally.add_range(h.refcount_table_offset >> geo.cluster_bits, h.refcount_table_clusters,
                    "refcount table")
    blocks = np.asarray(rc.table)
    blocks = blocks[blocks != 0]
    tally.add(blocks >> np.uint64(geo.cluster_bits), "refcount block")


def reference_counts(img, extra=0):
    """The expected refcount of every host cluster (a RefcountTally)."""
    cs, h = img.geo.cluster_size, img.header
    limit = max(-(-img.file.size() // cs), img.refcounts.end_cluster) + extra
    if h.nb_snapshots:      # a snapshot table may run past the end of the file (read as zeros)
        limit = max(limit, -(-(h.snapshots_offset + img.snapshot_table_bytes) // cs) + extra)
    tally = RefcountTally(limit)
    tally_mapping(img, tally)
    tally_bitmaps(img, tally)
    return tally


def rebuild_refcounts(img):
    """Make every stored refcount and COPIED flag match the metadata.

    The caller holds the image open for writing with no writes in flight.
    Clusters that the metadata uses are never handed out while refcount
    blocks are created here (they are reserved first).
    """
    rc, geo = img.refcounts, img.geo
    img.l2_cache.flush()
    img.refcount_cache.flush()
    rc.deferred = []
    drop_entries_past_eof(img)      # data lost with the file's end reads as zeros
    base = reference_counts(img)
    if base.outside:
        off, what = base.outside[0]
        raise CorruptImageError(f"{what} references host cluster {off << geo.cluster_bits:#x} "
                                "past the end of the image", offset=off << geo.cluster_bits,
                                field="refcount")
    # Never hand out a cluster the metadata uses -- nor the refcount table
    # and blocks themselves: where a block is missing, their stored
    # refcounts read as 0.
    structures = RefcountTally(len(base.counts))
    tally_refcount_structures(img, structures)
    rc.reserved = (base.counts > 0) | (structures.counts > 0)
    try:
        for _ in range(8):
            tally = RefcountTally(max(len(base.counts), rc.end_cluster))
            tally.counts[:len(base.counts)] = base.counts
            tally_refcount_structures(img, tally)
            want = tally.counts
            if want.max(initial=0) > min(geo.refcount_max, TALLY_MAX - 1):
                c = int(np.argmax(want))
                n = f"{int(want[c])}" + (" or more" if want[c] == TALLY_MAX else "")
                raise LimitExceededError(f"host cluster {c << geo.cluster_bits:#x} needs "
                                         f"refcount {n}, more than {geo.refcount_bits} bits "
                                         "hold")
            changed = _apply(rc, geo, want)
            if not changed:
                break
        else:
            raise RepairError("refcount rebuild did not converge")
    finally:
        rc.reserved = None
    rc.free_hint = 0
    _fix_copied_flags(img, want)
    img.refcount_cache.flush()
    img.l2_cache.flush()
    img.state.barrier()


def _apply(rc, geo, want):
    """Write ``want`` into the refcount blocks, a whole block at a time.
    Returns True if anything changed; creating a block changes the refcount
    structures themselves, so the caller tallies again."""
    from .._ext.kernels import refcount_encode
    E = geo.rb_entries
    nblocks = max(len(rc.table), -(-len(want) // E))
    stored = np.zeros(E, dtype=np.uint64)
    w = np.zeros(E, dtype=np.uint64)
    changed = False
    for t in range(nblocks):
        lo = t * E
        exists = t < len(rc.table) and rc.table[t] != 0
        if lo >= len(want) and not exists:
            continue
        rc.read_block_values(t, stored)
        w[:] = 0
        part = want[lo:lo + E]
        w[:len(part)] = part
        if np.array_equal(stored, w):
            continue
        if not exists:
            rc._alloc_block(t)
            return True
        slot, blk = rc._block(t)
        refcount_encode(w, geo.refcount_order, blk)
        rc.cache.mark_dirty(slot)
        changed = True
    return changed


def _fix_copied_flags(img, counts):
    """QCOW_OFLAG_COPIED on active L1/L2 entries iff the refcount is 1
    (``counts``: the refcount of every host cluster, as just rebuilt).
    Each L2 table is fixed once, however many entries name it."""
    geo, m = img.geo, img.mapping
    cb = np.uint64(geo.cluster_bits)

    def refcount_is_one(offsets):
        idx = (offsets >> cb).astype(np.int64)
        ok = idx < len(counts)
        out = np.zeros(len(idx), dtype=bool)
        out[ok] = counts[idx[ok]] == 1
        return out

    l1 = np.asarray(m.l1)      # (a view: state.l1 sees changes)
    l2offs = l2_table_offsets(l1)
    used = np.nonzero(l2offs)[0]
    wrong = used[refcount_is_one(l2offs[used]) != has_copied(l1[used])]
    if len(wrong):
        l1[wrong] ^= np.uint64(QCOW_OFLAG_COPIED)
        if len(wrong) < 64:
            for i in wrong.tolist():
                m.write_l1_entry(i)
        else:
            img.file.pwrite(l1.astype(">u8").tobytes(), img.header.l1_table_offset)
    for l2off in np.unique(l2offs[used]).tolist():
        for s in range(geo.l2_entries // geo.slice_entries):
            slot = img.l2_cache.load(l2off + s * geo.slice_bytes)
            l2 = np.asarray(img.l2_cache.u64(slot))[::geo.l2_entry_words]   # descriptors (a view)
            std = standard_allocated(l2)
            if img.state.external_data:     # host offset 0 of the data file: COPIED tells it
                std |= at_host0(l2)
            want = np.zeros(len(l2), dtype=bool)
            # (a data file's clusters count as referenced once: COPIED, as qemu)
            want[std] = True if img.state.external_data else refcount_is_one(host_offsets(l2[std]))
            wrong = np.nonzero(has_copied(l2) != want)[0]
            if len(wrong):
                l2[wrong] ^= np.uint64(QCOW_OFLAG_COPIED)
                img.l2_cache.mark_dirty(slot)
