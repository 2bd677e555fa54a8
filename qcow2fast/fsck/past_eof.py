"""L2 entries that point past the end of the image file, and their repair.

Such an entry is left by a power loss only when it reached the disk before
the data it points to (and the file growth that data implied): the write
order of engine/flush.py prevents that, but images written by older
versions or other programs can hold them.  qemu 7.2's check reports them
("counting reference for region exceeding the end of the file") and its
-r all leaves them (its rebuild then hands the cluster out twice); the
refcount rebuild cannot count a cluster outside the file.

The data is gone: the cluster reads as zeros (qemu reads past the end of
the file as zeros).  Repair turns the entry into a zero cluster -- in v2,
which has no zero flag, an unallocated one -- the way qemu's
fix_l2_entry_by_zero mends a misaligned preallocated entry: it reads as
before, and nothing else in the image changes.  ``check -r all`` plans
these fixes (fsck/check.py), also when it repairs a dirty image opened
for writing.
"""

import numpy as np

from ..spec.constants import QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_ZERO, SC_ALLOC_MASK, SC_ZERO_SHIFT
from ..spec.entries import host_offsets, is_compressed, standard_allocated

_ALL_ZEROES = SC_ALLOC_MASK << SC_ZERO_SHIFT


def past_eof(geo, desc, file_size):
    """Which L2 descriptors (native uint64 array) reference a host range
    that starts at or past ``file_size``, or ends a cluster or more past it
    (qemu's check counts that as corruption)."""
    end = np.uint64(file_size)
    past = standard_allocated(desc) & (host_offsets(desc) >= end)
    comp = is_compressed(desc)
    if comp.any():
        coff, csize = geo.compressed_extent(desc[comp])
        past[comp] = (coff >= end) | (coff + csize >= end + np.uint64(geo.cluster_size))
    return past


def replacement(version, desc, bitmap, extended):
    """(descriptor, bitmap word) that make one such entry read as zeros:
    the zero flag (v3), or nothing (v2); with extended entries the
    subclusters that were allocated (all of them for a compressed
    cluster) become zero subclusters, the others stay as they were."""
    if extended:
        if desc & QCOW_OFLAG_COMPRESSED:     # one unit, all of it data
            return 0, _ALL_ZEROES
        return 0, (bitmap | (bitmap << SC_ZERO_SHIFT)) & _ALL_ZEROES
    return (QCOW_OFLAG_ZERO if version >= 3 else 0), 0
