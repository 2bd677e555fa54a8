/* The qcow2 spec's constants and kinds, declared once (QEMU's
 * docs/interop/qcow2.txt; names after QEMU's block/qcow2.h).
 *
 * Cython sees them through qcow2fast/_ext/qcow2_spec.pxd (re-exported by
 * common.pxd); qcow2fast/_ext/spec.pyx exports the same values to Python,
 * where qcow2fast.spec.constants is the one place Python imports them from.
 * A new constant goes here, into qcow2_spec.pxd and into spec.pyx.
 */
#ifndef QCOW2_SPEC_H
#define QCOW2_SPEC_H

#include <stdint.h>

/* -- L1 and L2 entries, refcount table entries ------------------------------ */

/* The cluster's (or L2 table's) refcount is exactly 1: it may be written in
   place.  Never set on compressed clusters. */
#define QCOW_OFLAG_COPIED      (1ULL << 63)
#define QCOW_OFLAG_COMPRESSED  (1ULL << 62)
/* v3: the cluster reads as zeros (a host offset may still be allocated). */
#define QCOW_OFLAG_ZERO        (1ULL << 0)

#define L1E_OFFSET_MASK        0x00fffffffffffe00ULL
#define L2E_OFFSET_MASK        0x00fffffffffffe00ULL
#define REFT_OFFSET_MASK       0xfffffffffffffe00ULL

/* Bits that must be zero: L1 entry bits 0-8 and 56-62, standard L2 entry
   bits 1-8 and 56-61, refcount table entry bits 0-8. */
#define L1E_RESERVED_MASK      0x7f000000000001ffULL
#define L2E_STD_RESERVED_MASK  0x3f000000000001feULL
#define REFT_RESERVED_MASK     0x00000000000001ffULL

/* Bytes per entry. */
#define L1E_SIZE               8
#define L2E_SIZE_NORMAL        8
#define L2E_SIZE_EXTENDED      16     /* descriptor + subcluster bitmap */
#define REFTABLE_ENTRY_SIZE    8

/* -- extended L2 entries (subclusters) -------------------------------------- */

/* 32 subclusters per cluster.  The bitmap word: bit sc = subcluster sc is
   allocated, bit SC_ZERO_SHIFT + sc = subcluster sc reads as zeros. */
#define SC_BITS                5
#define SUBCLUSTERS            (1 << SC_BITS)
#define SC_ALLOC_MASK          0x00000000ffffffffULL
#define SC_ZERO_SHIFT          32

/* -- kinds ---------------------------------------------------------------- */

/* What an allocation unit (cluster or subcluster) of one layer is, as the
   mapping kernels return it (Python: qcow2fast.spec.constants.Kind). */
enum qcow2_kind {
    EXT_UNALLOCATED = 0,
    EXT_DATA = 1,
    EXT_ZERO = 2,          /* reads as zero (v3 zero flag, host offset may be set) */
    EXT_COMPRESSED = 3,
    EXT_INVALID = 4,       /* malformed entry: the caller reports corruption */
};

/* -- shifts derived from the header ---------------------------------------- */

/* log2 of the entries of an L2 table. */
static inline int qcow2_l2_bits(int cluster_bits, int extended_l2)
{
    return cluster_bits - (extended_l2 ? 4 : 3);
}

/* log2 of the allocation unit: the subcluster, or the cluster itself. */
static inline int qcow2_unit_bits(int cluster_bits, int extended_l2)
{
    return extended_l2 ? cluster_bits - SC_BITS : cluster_bits;
}

/* log2 of the entries of a refcount block (refcount_order: log2 of the
   refcount width in bits). */
static inline int qcow2_rb_bits(int cluster_bits, int refcount_order)
{
    return cluster_bits + 3 - refcount_order;
}

/* Compressed cluster descriptor: bits 0..x-1 host byte offset, bits
   x..61 the count of 512-byte sectors beyond the first, with
   x = 62 - (cluster_bits - 8). */
static inline int qcow2_csize_shift(int cluster_bits)
{
    return 62 - (cluster_bits - 8);
}

static inline uint64_t qcow2_csize_mask(int cluster_bits)
{
    return (1ULL << (cluster_bits - 8)) - 1;
}

static inline uint64_t qcow2_coffset_mask(int cluster_bits)
{
    return (1ULL << qcow2_csize_shift(cluster_bits)) - 1;
}

#endif /* QCOW2_SPEC_H */
