# The spec's constants and kinds: declarations of csrc/qcow2_spec.h, where
# the values and their meaning are (declared once).  cimport them from
# common.pxd, which re-exports this file; Python gets the same values from
# qcow2fast.spec.constants (exported by spec.pyx).

from libc.stdint cimport uint64_t

cdef extern from "qcow2_spec.h" nogil:
    const uint64_t QCOW_OFLAG_COPIED
    const uint64_t QCOW_OFLAG_COMPRESSED
    const uint64_t QCOW_OFLAG_ZERO
    const uint64_t L1E_OFFSET_MASK
    const uint64_t L2E_OFFSET_MASK
    const uint64_t REFT_OFFSET_MASK
    const uint64_t L1E_RESERVED_MASK
    const uint64_t L2E_STD_RESERVED_MASK
    const uint64_t REFT_RESERVED_MASK
    const uint64_t SC_ALLOC_MASK

    enum:
        L1E_SIZE
        L2E_SIZE_NORMAL
        L2E_SIZE_EXTENDED
        REFTABLE_ENTRY_SIZE
        SC_BITS
        SUBCLUSTERS
        SC_ZERO_SHIFT

    enum:
        EXT_UNALLOCATED
        EXT_DATA
        EXT_ZERO
        EXT_COMPRESSED
        EXT_INVALID

    int qcow2_l2_bits(int cluster_bits, int extended_l2)
    int qcow2_unit_bits(int cluster_bits, int extended_l2)
    int qcow2_rb_bits(int cluster_bits, int refcount_order)
    int qcow2_csize_shift(int cluster_bits)
    uint64_t qcow2_csize_mask(int cluster_bits)
    uint64_t qcow2_coffset_mask(int cluster_bits)
