"""Changing an image's version (qemu's qcow2_downgrade, qcow2_upgrade and
qcow2_expand_zero_clusters): v3 (compat=1.1) to v2 (compat=0.10) and back.

v2 has no zero flag, so a downgrade first turns every zero cluster --
of the active disk and of every internal snapshot -- into something v2
reads as zeros: without a backing file, an unallocated entry; with one, a
cluster of zeros (shared by as many tables as share its L2 table, as in
qemu); a zero cluster that kept its host cluster has that cluster zeroed.

Write order of the expansion (each barrier an fdatasync):
- new clusters are allocated and zeroed, their refcounts written,
  barrier: the clusters and their counts are stable before any L2 entry
  points to them;
- the rewritten L2 tables, barrier.
Only then is the header's version switched (one write of the header
area).  A crash before the switch leaves a v3 image whose zero clusters
are partly already data clusters of zeros: the same disk, consistent.
"""

from .._numpy import np

from ..spec import header as hdr
from ..spec.constants import L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, \
    QCOW_OFLAG_ZERO
from ..spec.entries import decode_table, l2_table_offsets
from . import features
from .snapshot import check_l1_fields, snapshot_l1

BATCH_TABLES = 256              # L2 tables rewritten per pair of barriers


def downgrade_problems(img, has_compressed, refcount_bits, size=None):
    """qemu's reasons not to downgrade (checked before anything is written);
    ``has_compressed()`` says whether any cluster is compressed,
    ``refcount_bits`` is the width and ``size`` the virtual size (default:
    the current one) the image will have by then."""
    h = img.header
    size = img.size if size is None else size
    if refcount_bits != 16:
        return "compat=0.10 requires refcount_bits=16"
    for sn in img.snapshots:
        if sn.vm_state_size > 0xFFFFFFFF or (sn.disk_size is not None
                                             and sn.disk_size != size):
            return "Internal snapshots prevent downgrade of image"
    others = h.incompatible_features & ~(hdr.INCOMPAT_COMPRESSION | hdr.INCOMPAT_DIRTY)
    if others & hdr.INCOMPAT_DATA_FILE:
        return "Cannot downgrade an image with a data file"
    if others:
        return f"Cannot downgrade an image with incompatible features {others:#x} set"
    if h.incompatible_features & hdr.INCOMPAT_COMPRESSION and has_compressed():
        return ("Cannot downgrade an image with zstd compression type and existing "
                "compressed clusters")
    for sn in img.snapshots:        # (qemu fails on them in the expansion: nothing written here)
        check_l1_fields(sn, img.geo.cluster_size)
    return None


def downgrade(img, progress=None):
    """Make the open image ``img`` (r+, checked by downgrade_problems) a
    v2 image.  The image must be closed afterwards."""
    s, h = img.state, img.header
    img.flusher.flush(sync=True, final=True)
    if features.is_dirty(s):
        features.set_dirty(s, False)
    expand_zero_clusters(img, progress)
    old_length = len(h.pack())
    h.version = 2
    h.compatible_features = h.autoclear_features = h.incompatible_features = 0
    h.compression_type = hdr.COMPRESSION_ZLIB
    h.header_length = hdr.V2_HEADER_LENGTH
    features.write_header(s, old_length)
    s.barrier()                 # barrier: the version switch is stable
    s.read_only = True          # the open image still has v3 state


def upgrade(img, progress=None):
    """Make the v2 image ``img`` a v3 one (the header only).  ``progress``
    gets qemu's three points: 0/2, 1/2 with the snapshot table v3-ready,
    2/2."""
    s, h = img.state, img.header
    report = progress or (lambda done, total: None)
    report(0, 2)
    if any(len(sn.extra_data) < 16 for sn in img.snapshots):
        # v3 needs each entry's VM state size and disk size: the table is
        # written anew with them (qemu's qcow2_write_snapshots; a v2 reader
        # skips extra data), in new clusters before the header switches.
        img._snapshot_ops().rewrite_table()
    img.flush()
    report(1, 2)
    old_length = len(h.pack())
    h.version = 3
    h.header_length = hdr.V3_HEADER_LENGTH
    h.compression_type = hdr.COMPRESSION_ZLIB
    h.extra_fields = bytes(hdr.V3_HEADER_LENGTH - hdr.COMPRESSION_TYPE_OFFSET - 1)
    features.write_header(s, old_length)
    s.barrier()
    report(2, 2)


def expand_zero_clusters(img, progress=None):
    """Turn every zero cluster (active and snapshot L2 tables) into what v2
    reads as zeros; see the module doc for the write order."""
    s, geo = img.state, img.geo
    f, cs = s.file, geo.cluster_size
    backed = bool(img.header.backing_file)
    l1s = [img.mapping.l1]
    size = f.size()
    for sn in img.snapshots:
        l1s.append(snapshot_l1(f, sn, cs, size))
    tables = sorted({int(o) for l1 in l1s for o in l2_table_offsets(l1).tolist() if o})
    # The guest offset each table maps first (legacy AES derives IVs from it).
    table_guest = {}
    for l1 in l1s:
        for i, o in enumerate(l2_table_offsets(l1).tolist()):
            if o:
                table_guest.setdefault(int(o), i << (geo.cluster_bits + geo.l2_bits))
    s.l2_cache.invalidate_all()         # (clean: flushed by the caller) tables change on disk
    visits = _L1Visits(l1s, progress)
    for k in range(0, len(tables), BATCH_TABLES):
        batch = tables[k:k + BATCH_TABLES]
        _expand_batch(img, batch, backed, table_guest)
        visits.done(batch)
    visits.done(())


class _L1Visits:
    """qemu's progress of the expansion: one step per L1 entry, the active
    table's then each snapshot's, in that order, an entry counted once its
    L2 table is expanded (or at once if it has none).  The tables are
    expanded in batches in disk order; the steps reported after a batch are
    those of the entries now done in qemu's order, one call each."""

    def __init__(self, l1s, progress):
        self.progress = progress
        self.order = [] if progress is None else \
            [int(o) for l1 in l1s for o in l2_table_offsets(l1).tolist()]
        self.expanded = set()
        self.visited = 0

    def done(self, tables):
        if self.progress is None:
            return
        self.expanded.update(tables)
        n = len(self.order)
        while self.visited < n and (not self.order[self.visited]
                                    or self.order[self.visited] in self.expanded):
            self.visited += 1
            self.progress(self.visited, n)


def _expand_batch(img, tables, backed, table_guest):
    s, geo, rc = img.state, img.geo, img.refcounts
    f, cs, cb = s.file, geo.cluster_size, geo.cluster_bits
    changed = []
    released = []           # (host cluster, references) dropped once the L2 tables are written
    for l2off in tables:
        l2 = decode_table(f.pread(l2off, cs))
        zero = np.nonzero(((l2 & np.uint64(QCOW_OFLAG_ZERO)) != 0)
                          & ((l2 & np.uint64(QCOW_OFLAG_COMPRESSED)) == 0))[0]
        if not len(zero):
            continue
        shared = rc.get(l2off >> cb)            # tables pointing to this L2 table
        plain = zero[(l2[zero] & np.uint64(L2E_OFFSET_MASK)) == 0]
        kept = []
        g0 = table_guest[l2off]
        for i in zero[(l2[zero] & np.uint64(L2E_OFFSET_MASK)) != 0].tolist():
            host = int(l2[i]) & L2E_OFFSET_MASK
            if rc.get(host >> cb) > shared:
                # Another table also maps the cluster (a zero write that kept
                # the offset of a cluster a snapshot shares): zeroing it in
                # place would change what the others read -- qemu 7.2 does,
                # and loses that data.  This entry gets a zero cluster of
                # its own, as a plain one does.
                released.append((host >> cb, shared))
                plain = np.append(plain, i)
            else:
                kept.append(i)
        for i in kept:
            e = int(l2[i]) & ~QCOW_OFLAG_ZERO
            _zero_cluster(img, e & L2E_OFFSET_MASK, [g0 + (i << cb)])
            if rc.get((e & L2E_OFFSET_MASK) >> cb) != 1:    # COPIED iff refcount 1
                e &= ~QCOW_OFLAG_COPIED
            l2[i] = np.uint64(e)
        if len(plain) and not backed:
            l2[plain] = 0           # v2 without a backing file reads it as zeros
        elif len(plain):
            first = img.clusters.alloc(len(plain))
            if shared > 1:
                rc.update(first >> cb, len(plain), shared - 1)
            _zero_cluster(img, first, [g0 + (i << cb) for i in plain.tolist()])
            copied = QCOW_OFLAG_COPIED if shared == 1 else 0
            l2[plain] = (np.arange(len(plain), dtype=np.uint64) * np.uint64(cs)
                         + np.uint64(first)) | np.uint64(copied)
        changed.append((l2off, l2))
    if not changed:
        return
    s.refcount_cache.flush()
    f.truncate(max(f.size(), s.alloc_end))
    s.barrier()                 # barrier: zeroed clusters and their refcounts before the L2 entries
    for l2off, l2 in changed:
        f.pwrite(l2.astype(">u8").tobytes(), l2off)
    s.barrier()                 # barrier: the L2 tables before the version switch, and
                                # before the references they dropped (a crash leaks them)
    for cluster, n in released:
        rc.update(cluster, 1, -n)
    if released:
        s.refcount_cache.flush()
        s.barrier()


def _zero_cluster(img, host, guests):
    """Make the host clusters from ``host`` on, one per guest offset of
    ``guests`` (where the guest reads them), read as zeros."""
    s, cs = img.state, img.geo.cluster_size
    nbytes = len(guests) * cs
    if host >= s.zero_from:
        s.allocated(host + nbytes)
        return
    if s.transform is None and s.data_file.zero_range(host, nbytes):
        return
    zeros = memoryview(bytes(min(cs, 1 << 20)))
    for k, guest in enumerate(guests):
        for at in range(0, cs, len(zeros)):
            s.write_data_pieces([zeros], host + k * cs + at, guest + at)
    s.allocated(host + nbytes)
