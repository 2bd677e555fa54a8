"""Changing the refcount width (qemu's qcow2_change_refcount_order in
qcow2-refcount.c): the refcount table and blocks are rewritten at the new
width beside the old ones, and the header switches to them in one write.

Write order (each barrier an fdatasync, none under cache=unsafe):

1. the new blocks and the new table are allocated through the old
   structures (which then count them), repeated until every new block
   needed to count the image -- the new structures included -- has a
   place; the old structures are written, barrier;
2. the new blocks (every refcount, as the old structures now hold it) and
   the new table are written, barrier: they are complete before the
   header points to them;
3. the header's refcount fields (table offset, table clusters, order: all
   in its first sector, one write), barrier;
4. (``free_old_structures``, on the image reopened at the new width) the
   old table and blocks are freed.

A crash before 3 leaves the old structures in charge, which count the new
ones (leaked clusters); after 3 the new ones, which count the old ones
until 4 frees them (leaks again).  Never a cluster in use counted free.
"""

from array import array

from .._ext.kernels import nonzero_blocks_u64, refcount_encode, table_first_with
from ..errors import CorruptImageError, InvalidArgumentError, LimitExceededError
from ..spec.geometry import Geometry
from ..spec.header import MAX_REFTABLE_BYTES
from ..spec.tables import ALL_BITS, encode_table
from . import features


def all_refcounts(rc, geo):
    """Every stored refcount (uint64, one per host cluster up to the last
    refcount block: a cluster past it has refcount 0)."""
    E = geo.rb_entries
    present = refuse_blocks_past_end(rc, geo)
    out = array("Q", [0]) * ((present[-1] + 1 if present else 0) * E)
    view = memoryview(out)
    for t in present:
        rc.read_block_values(t, view[t * E:(t + 1) * E])
    return out


def refuse_blocks_past_end(rc, geo):
    """The refcount table indexes with a block, in order; a block for
    clusters past everything the image holds counts nothing that exists,
    and is refused (a hostile table would make all_refcounts huge)."""
    E = geo.rb_entries
    present = [t for t, e in enumerate(rc.table) if e]
    limit = max(rc.end_cluster, -(-rc.file.size() // geo.cluster_size))
    if present and present[-1] * E >= limit:
        t = present[-1]
        raise CorruptImageError(
            f"refcount table entry {t} is for host clusters from {(t * E) << geo.cluster_bits:#x}"
            f", past the end of the image ({limit << geo.cluster_bits:#x}); run check -r all",
            offset=rc.header.refcount_table_offset + 8 * t, field="refcount table")
    return present


def refuse_narrowing(counts, cluster_bits, bits):
    """qemu's error if a refcount of ``counts`` (all_refcounts) does not
    fit in ``bits`` bits."""
    c = table_first_with(counts, ALL_BITS & ~((1 << bits) - 1))
    if c >= 0:
        raise InvalidArgumentError(
            f"Cannot decrease refcount entry width to {bits} bits: Cluster at offset "
            f"{c << cluster_bits:#x} has a refcount of {counts[c]}")


def change_refcount_order(img, order, progress=None):
    """Rewrite the refcount structures of the open image ``img`` (r+, no
    writes in flight) at width ``1 << order`` and switch the header to
    them.  Returns the old structures, [(host offset, clusters)], for
    :func:`free_old_structures` once the image is reopened; the open image
    must then be closed (its refcount subsystem still has the old width)."""
    s, h, geo, rc = img.state, img.header, img.geo, img.refcounts
    new = Geometry(geo.cluster_bits, order, extended_l2=geo.extended_l2)
    img.flusher.flush(sync=True, final=True)        # every refcount current and on disk
    if features.is_dirty(s):
        features.set_dirty(s, False)                # (lazy refcounts: they are, now)
    counts = all_refcounts(rc, geo)
    if order < geo.refcount_order:
        refuse_narrowing(counts, geo.cluster_bits, new.refcount_bits)
    blocks = {}                 # new table index -> host offset of the new block
    table_off = table_clusters = 0
    walks = 0
    while True:
        # (qemu's walks: at least this one, one that finds nothing new to
        # allocate, and the one that writes the blocks)
        _walk(rc, walks, max(walks + 2, 3), progress)
        walks += 1
        need = nonzero_blocks_u64(counts, new.rb_bits)
        missing = [t for t in need if t not in blocks]
        want = new.reftable_clusters(need[-1] + 1)
        if not missing and want <= table_clusters:
            break
        if want * new.cluster_size > MAX_REFTABLE_BYTES:
            raise LimitExceededError("This operation would make the refcount table grow "
                                     "beyond the maximum size supported by QEMU, aborting")
        if missing:
            first = rc.alloc(len(missing))
            for k, t in enumerate(missing):
                blocks[t] = first + k * new.cluster_size
        if want > table_clusters:
            if table_clusters:
                rc.free(table_off, table_clusters)
            table_off, table_clusters = rc.alloc(want), want
        counts = all_refcounts(rc, geo)     # the allocations changed them
    # What the switch replaces, as the allocations left it (they may have
    # grown the old table).
    old = [(h.refcount_table_offset, h.refcount_table_clusters)]
    old += [(b, 1) for b in rc.table if b]
    s.refcount_cache.flush()
    s.barrier()                 # barrier: the old structures count the new ones
    table = array("Q", [0]) * (table_clusters * new.cluster_size // 8)
    E = new.rb_entries
    buf = bytearray(new.cluster_size)
    for t, off in sorted(blocks.items()):
        values = counts[t * E:(t + 1) * E]
        values.extend(array("Q", [0]) * (E - len(values)))
        refcount_encode(values, order, buf)
        s.file.pwrite(buf, off)
        table[t] = off
    _walk(rc, walks, walks + 1, progress)
    s.file.pwrite(encode_table(table), table_off)
    s.barrier()                 # barrier: the new structures are complete before the header
    h.refcount_table_offset, h.refcount_table_clusters = table_off, table_clusters
    h.refcount_order = order
    features.write_header_fields(s, "refcount_table_offset", "refcount_order")
    s.barrier()                 # barrier: the switch is stable before the old ones are freed
    s.read_only = True          # this open image still has the old width: no more writes
    return old


def _walk(rc, index, total, report):
    """The progress of qemu's walk number ``index`` of ``total`` over the
    old refcount table (walk_over_reftable): one step per table entry, in
    units of table entries (the table may have grown since the last walk).
    Nothing without ``report``: a step per entry costs a call each."""
    if report is None:
        return
    n = len(rc.table)
    for t in range(n + 1):
        report(index * n + t, total * n)


def free_old_structures(img, old):
    """Free what :func:`change_refcount_order` replaced (``img`` reopened)."""
    for off, n in old:
        img.refcounts.free(off, n)
    img.flush()

