# cython: language_level=3
"""The spec's constants and kinds (csrc/qcow2_spec.h), exported to Python.

Python code imports them from :mod:`qcow2fast.spec.constants`, which
re-exports these names; the kernels cimport the same C names from
common.pxd.  So the values exist once, in the header."""

cimport qcow2fast._ext.qcow2_spec as C

# L1/L2 entry bits and masks, refcount table masks.
QCOW_OFLAG_COPIED = C.QCOW_OFLAG_COPIED
QCOW_OFLAG_COMPRESSED = C.QCOW_OFLAG_COMPRESSED
QCOW_OFLAG_ZERO = C.QCOW_OFLAG_ZERO
L1E_OFFSET_MASK = C.L1E_OFFSET_MASK
L2E_OFFSET_MASK = C.L2E_OFFSET_MASK
REFT_OFFSET_MASK = C.REFT_OFFSET_MASK
L1E_RESERVED_MASK = C.L1E_RESERVED_MASK
L2E_STD_RESERVED_MASK = C.L2E_STD_RESERVED_MASK
REFT_RESERVED_MASK = C.REFT_RESERVED_MASK

# Entry sizes in bytes.
L1E_SIZE = C.L1E_SIZE
L2E_SIZE_NORMAL = C.L2E_SIZE_NORMAL
L2E_SIZE_EXTENDED = C.L2E_SIZE_EXTENDED
REFTABLE_ENTRY_SIZE = C.REFTABLE_ENTRY_SIZE

# Extended L2 entries.
SC_BITS = C.SC_BITS
SUBCLUSTERS = C.SUBCLUSTERS
SC_ALLOC_MASK = C.SC_ALLOC_MASK
SC_ZERO_SHIFT = C.SC_ZERO_SHIFT

# Kinds returned by the mapping kernels.
EXT_UNALLOCATED = C.EXT_UNALLOCATED
EXT_DATA = C.EXT_DATA
EXT_ZERO = C.EXT_ZERO
EXT_COMPRESSED = C.EXT_COMPRESSED
EXT_INVALID = C.EXT_INVALID


# Shifts derived from the header (the formulas are the header's).

def l2_bits(int cluster_bits, bint extended_l2):
    """log2 of the entries of an L2 table."""
    return C.qcow2_l2_bits(cluster_bits, extended_l2)


def unit_bits(int cluster_bits, bint extended_l2):
    """log2 of the allocation unit: the subcluster, or the cluster."""
    return C.qcow2_unit_bits(cluster_bits, extended_l2)


def rb_bits(int cluster_bits, int refcount_order):
    """log2 of the entries of a refcount block."""
    return C.qcow2_rb_bits(cluster_bits, refcount_order)


def csize_shift(int cluster_bits):
    """Shift of the sector count in a compressed cluster descriptor."""
    return C.qcow2_csize_shift(cluster_bits)


def csize_mask(int cluster_bits):
    """Mask of the sector count (after the shift) of a compressed descriptor."""
    return C.qcow2_csize_mask(cluster_bits)


def coffset_mask(int cluster_bits):
    """Mask of the host byte offset of a compressed cluster descriptor."""
    return C.qcow2_coffset_mask(cluster_bits)
