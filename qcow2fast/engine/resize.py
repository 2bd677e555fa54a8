"""Growing and shrinking the guest disk (qemu's qcow2_co_truncate,
qcow2_shrink_l1_table and qcow2_shrink_reftable; bdrv_co_truncate's rule
for a backing file longer than the old disk).

Rules, as qemu 7.2:
- the new size is a multiple of 512; shrinking needs ``shrink=True``;
  preallocation (metadata, falloc, full) only when growing;
- a v2 image with internal snapshots is not resized (v2 snapshots need not
  record their disk size); snapshots keep their own L1 tables and sizes;
- growing over a backing file longer than the old disk makes the new area
  read as zeros (v3 zero flags; a v2 image cannot, and is refused);
- growing makes the whole new area read as zeros: also the tail of the old
  last cluster, where a shrink to a size inside a cluster left the bytes
  past it (qemu 7.2 shows those old bytes again after such a grow);
- shrinking frees every cluster past the new end (whole clusters: the tail
  of the last partial cluster keeps its bytes, as in qemu), empties the L1
  entries past it in place (the table keeps its size and place, as in
  qemu), drops refcount blocks that count nothing any more, and truncates
  the file after the last cluster in use.

Write order (each barrier an fdatasync, none under cache=unsafe):
- grow: a larger L1 table is written, barrier, the header points to it,
  barrier, the old table is freed (Mapping.grow_l1); zero flags or
  preallocated L2 entries, and the zeroed tail of the old last cluster,
  are written with the ordered flush (their clusters' refcounts first);
  then the header's size, barrier.  A crash
  before the size leaves the old disk, with metadata past its end that
  reads as it will after the resize.
- shrink: the header's size is written first, barrier: from then on the
  new disk is what any reader sees, and nothing past its end is read; L2
  entries past the end are cleared and flushed (their clusters freed only
  after, FlushOrder), the L1 entries past the end are zeroed, barrier,
  and only then are those L2 tables and the clusters they alone mapped
  freed.  A crash at any point leaves the old or the new disk, with leaks
  at worst.
"""

import warnings
from array import array

from .._ext import kernels
from ..errors import (InvalidArgumentError, LeakWarning, LimitExceededError,
                      UnsupportedFeatureError)
from ..spec import header as hdr
from ..spec.constants import L1E_OFFSET_MASK, L1E_SIZE, SECTOR
from ..spec.tables import ALL_BITS, encode_table
from . import features
from .snapshot_refcount import Tree, new_counts

_TABLES_AT_ONCE = 512           # dropped L2 tables read (and held) at a time

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


def check_resize(img, size, shrink, preallocation):
    """Refuse, before anything is written, what qemu refuses."""
    s, h = img.state, img.header
    if preallocation not in PREALLOCATION_MODES:
        raise InvalidArgumentError(f"Unsupported preallocation mode '{preallocation}' "
                                   f"(one of {', '.join(PREALLOCATION_MODES)})")
    if not isinstance(size, int) or size < 0:
        raise InvalidArgumentError(f"the new size must be a non-negative integer, not {size!r}")
    if size % SECTOR:
        raise InvalidArgumentError(f"The new size must be a multiple of {SECTOR}")
    if h.nb_snapshots and h.version < 3:
        raise UnsupportedFeatureError("Can't resize a v2 image which has snapshots",
                                      feature="snapshots")
    img.dirty_bitmaps.check_resize()
    if img.geo.l1_size_for(size) > hdr.MAX_L1_BYTES // L1E_SIZE:
        raise LimitExceededError(f"Failed to grow the L1 table: a size of {size} needs more "
                                 f"than qemu's {hdr.MAX_L1_BYTES >> 20} MiB of L1 table")
    if size < s.size:
        if preallocation != "off":
            raise InvalidArgumentError("Preallocation can't be used for shrinking an image")
        if not shrink:
            raise InvalidArgumentError(f"shrinking the disk from {s.size} to {size} bytes "
                                       "deletes the data past the new end: pass shrink=True")
    elif size > s.size and _backing_shows_through(img) and h.version < 3:
        # qemu: bdrv_co_truncate asks for zeroes, qcow2 v2 has no zero flag.
        raise UnsupportedFeatureError("Failed to zero out new clusters: Operation not "
                                      "supported", feature="zero clusters")


def _backing_shows_through(img):
    """Whether the backing file would show data in the area a grow adds."""
    return img.backing is not None and img.backing.size > img.state.size


def resize(img, size, shrink=False, preallocation="off"):
    """Resize the open image ``img`` (the caller holds its exclusive lock)."""
    check_resize(img, size, shrink, preallocation)
    df = img.clusters.datafile
    if df is not None and df.raw and preallocation == "off" and size > img.state.size:
        preallocation = "metadata"      # data_file_raw: every L2 entry allocated (qemu)
    if size == img.state.size:
        return
    with features.steps(img.state, f"resizing to {size} bytes"):
        if size > img.state.size:
            _grow(img, size, preallocation)
        else:
            _shrink(img, size)
        if df is not None:
            df.resize(size, preallocation)  # the data file follows the disk (qcow2_co_truncate)
        img.dirty_bitmaps.resize(size)


# -- growing -------------------------------------------------------------------------------

def _grow(img, size, preallocation):
    s, geo, clusters = img.state, img.geo, img.clusters
    old = s.size
    img.mapping.grow_l1(geo.l1_size_for(size), img.refcounts, s.barrier,
                        s.refcount_cache.flush)
    zero_backing = _backing_shows_through(img)
    # The active L1 table may map clusters past the old end: the VM state
    # that a snapshot's apply brought along (qemu's goto copies the
    # snapshot's whole L1 table).  It is no guest data: grown over, it would
    # show the guest a saved VM state (qemu 7.2 shows it), so it is
    # unmapped first and the new area reads as zeros.
    past = geo.l1_size_for(old)
    if any(img.mapping.l1[past:geo.l1_size_for(size)]):
        stale = past * geo.bytes_per_l2()
        s.set_size(size)
        try:
            clusters.write_zeroes(stale, size - stale, True)
        finally:
            s.set_size(old)
    if preallocation != "off":
        # From the old last cluster: the new area starts inside it when it is
        # partial.  Mapped, it keeps its mapping and data; unmapped, its
        # head is written first (what the guest sees there: zeros or the
        # backing file's data) into a cluster of its own, as qemu's
        # copy-on-write of it does, and the rest is preallocated with it.
        start = old // geo.cluster_size * geo.cluster_size
        if start < old and not clusters.has_host_cluster(start):
            head = memoryview(bytearray(old - start))
            clusters.read(start, head)
            clusters.write(start, head)
        clusters.preallocate(preallocation, start, size)
    # What reads as zeros from the old end on: the whole new area over a
    # backing file that would show through, else the rest of the old last
    # cluster (a shrink left its bytes there, as in qemu).  Clusters
    # preallocated with falloc/full are zeros of this layer already (qemu
    # writes no zero flags over them); not so with subclusters (none is
    # allocated: the backing file shows through) or a data file (its
    # old bytes).
    fresh = (preallocation in ("falloc", "full") and not geo.extended_l2
             and clusters.datafile is None)
    last = -(-old // geo.cluster_size) * geo.cluster_size
    end = size if zero_backing and not fresh else min(size, last)
    if end > old:
        # The L2 entries and data change under the new size (the zeroing code
        # works up to the disk's end); the header still says the old one, so
        # a crash before the size is written shows the old disk unchanged.
        s.set_size(size)
        try:
            clusters.write_zeroes(old, end - old, False)
        except BaseException:
            s.set_size(old)
            raise
    # Barrier (in the flush): the new L2 entries and the refcounts they use
    # are stable before the header's size makes them part of the disk.
    img.flusher.flush(sync=True)
    _write_size(s, size)


def _write_size(s, size):
    s.set_size(size)
    features.write_header_field(s, "size")
    s.barrier()                 # barrier: the size is stable before what relies on it


# -- shrinking ------------------------------------------------------------------------------

def _shrink(img, size):
    s, geo = img.state, img.geo
    cs = geo.cluster_size
    old = s.size
    _write_size(s, size)
    # Clusters wholly past the new end (qemu's qcow2_cluster_discard with
    # full_discard: unallocated, even over a backing file).  Whole L2 tables
    # past the new L1 size are dropped below instead of being rewritten.
    start = -(-size // cs) * cs
    new_l1 = geo.l1_size_for(size)
    table_end = min(-(-old // cs) * cs, new_l1 * geo.bytes_per_l2())
    if start < table_end:
        img.clusters.set_entries(start, table_end, "full", True)
    # Barrier (in the flush): the cleared L2 entries are stable before the
    # clusters they used are freed.
    img.flusher.flush(sync=True)
    _shrink_l1(img, new_l1)
    _shrink_reftable(img)
    _truncate_tail(img)


def _shrink_l1(img, new_l1):
    """Zero the L1 entries from ``new_l1`` on (in place), then free their L2
    tables and what those tables alone referenced."""
    s, geo, m, rc = img.state, img.geo, img.mapping, img.refcounts
    l1 = m.l1                   # (state.l1 is a view of it: it sees changes)
    if new_l1 >= len(l1) or kernels.table_first_with(l1[new_l1:], L1E_OFFSET_MASK) < 0:
        return
    cb = geo.cluster_bits
    tail = array("Q", l1[new_l1:])
    tables = [e & L1E_OFFSET_MASK for e in tail if e & L1E_OFFSET_MASK]
    # ``counts``: per host cluster, the references the dropped tables hold
    # (a cluster is counted once per L1 table reaching it, a table shared
    # with a snapshot included: what this L2 table maps loses one too).
    counts = new_counts(s, rc)
    kernels.tally_add(counts, array("q", [t >> cb for t in tables]))
    if not s.external_data:     # (a data file's clusters have no refcounts: datafile.py)
        for i in range(0, len(tail), _TABLES_AT_ONCE):
            _tally_mapped(Tree(s, tail[i:i + _TABLES_AT_ONCE]), counts)
    s.file.pwrite(bytes(len(tail) * L1E_SIZE), img.header.l1_table_offset + new_l1 * L1E_SIZE)
    s.barrier()             # barrier: no L1 entry points to the tables before they are freed
    for t in tables:
        m.metadata.remove(t >> cb)
    kernels.table_and(memoryview(l1)[new_l1:], 0)
    m.l1_pending.clear()
    s.l2_cache.invalidate_all()         # (clean: flushed above)
    for first, n, k in kernels.count_runs(counts):
        for _ in range(k):
            rc.free_deferred(first << cb, n)
    # The frees, their refcount blocks and a barrier; clusters left unused
    # are discarded in the file (qemu: QCOW2_DISCARD_ALWAYS).
    img.flusher.flush(sync=True)


def _tally_mapped(tree, counts):
    """Add the clusters ``tree``'s L2 tables map to ``counts``.  A table
    with an entry check would report (reserved bits, an unaligned or
    out-of-file offset) is not understood: what it maps is left allocated
    (leaked, for check -r leaks), never freed."""
    for r in tree.tally_mapped(counts):
        msg = (f"the L2 table at {tree.offsets[r]:#x} holds invalid entries: the clusters "
               "it maps are left allocated (leaked)")
        warnings.warn(LeakWarning(msg, msg), stacklevel=4)


def _shrink_reftable(img):
    """Drop the refcount blocks that count nothing but themselves (qemu's
    qcow2_shrink_reftable): the table is rewritten in place without them,
    barrier, then they are freed."""
    s, geo, rc = img.state, img.geo, img.refcounts
    table = rc.table            # (the allocator's view: changed in place)
    cb, E = geo.cluster_bits, geo.rb_entries
    values = array("Q", [0]) * E
    unused = []
    for t in [t for t, e in enumerate(table) if e]:
        b = table[t] >> cb
        rc.read_block_values(t, values)
        if b >> geo.rb_bits == t:
            values[b & (E - 1)] = 0         # its own reference does not count
        if kernels.table_first_with(values, ALL_BITS) < 0:
            unused.append(t)
    if not unused:
        return
    new = array("Q", table)
    for t in unused:
        new[t] = 0
    s.refcount_cache.flush()
    s.file.pwrite(encode_table(new), img.header.refcount_table_offset)
    s.barrier()                 # barrier: the table no longer points to them
    blocks = [table[t] >> cb for t in unused]
    s.refcount_cache.invalidate_all()
    for t in unused:
        table[t] = 0
    for t, b in zip(unused, blocks):
        img.state.metadata.remove(b)
        if b >> geo.rb_bits != t:           # counted elsewhere: drop that count
            rc.free_deferred(b << cb, 1)
        else:                               # it counted itself: nothing else to update
            s.file.punch_hole(b << cb, geo.cluster_size)
    img.flusher.flush(sync=True)


def _truncate_tail(img):
    """Cut the file after the last cluster in use (qemu: qcow2_get_last_cluster)."""
    s, geo, rc = img.state, img.geo, img.refcounts
    if s.file.is_device:
        return
    E = geo.rb_entries
    values = array("Q", [0]) * E
    last = 0
    for t in reversed([t for t, e in enumerate(rc.table) if e]):
        rc.read_block_values(t, values)
        used = len(values.tobytes().rstrip(b"\0"))     # bytes up to the last nonzero value
        if used:
            last = t * E + (used - 1) // 8
            break
    end = (last + 1) << geo.cluster_bits
    if end < s.file.size():
        # Barrier: under lazy refcounts too, no refcount on disk still
        # counts a cluster past the new end of the file.
        s.refcount_cache.flush()
        s.barrier()
        s.file.truncate(end)
    s.alloc_end = end
    s.zero_from = min(s.zero_from, end)
    s.durable_end = min(s.durable_end, end)
    rc.end_cluster = last + 1
    rc.free_hint = 0
