# Shared inline helpers of the qcow2fast kernels: cimport them, never copy.
#
# Conventions: L2 slices and L1 tables are kept in native byte order in
# memory (decoded once when loaded); refcount blocks are kept exactly as on
# disk (big-endian, sub-byte widths packed LSB first) and accessed here.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

cdef extern from "qf_io.h" nogil:
    int64_t qf_pread_full(int fd, char *buf, size_t len, int64_t off)
    int64_t qf_pwrite_full(int fd, const char *buf, size_t len, int64_t off, size_t max)
    size_t QF_WRITE_MAX
    size_t qf_write_piece(int64_t off, size_t left, size_t max)
    int qf_punch_hole(int fd, int64_t off, int64_t len)
    int qf_zero_range(int fd, int64_t off, int64_t len)

cdef extern from *:
    """
    #define QF_BSWAP64(x) __builtin_bswap64(x)
    #define QF_BSWAP32(x) __builtin_bswap32(x)
    #define QF_BSWAP16(x) __builtin_bswap16(x)
    """
    uint64_t QF_BSWAP64(uint64_t) nogil
    uint32_t QF_BSWAP32(uint32_t) nogil
    uint16_t QF_BSWAP16(uint16_t) nogil

# The spec's constants and kinds (QCOW_OFLAG_*, L1E_*/L2E_*/REFT_* masks,
# EXT_* kinds, subcluster bitmap layout, shift helpers): declared once in
# csrc/qcow2_spec.h, cimportable from here under the same names.
from .qcow2_spec cimport *


cdef inline int l2_entry_kind(uint64_t e) noexcept nogil:
    if e & QCOW_OFLAG_COMPRESSED:
        return EXT_COMPRESSED
    if e & L2E_STD_RESERVED_MASK:
        return EXT_INVALID
    if e & QCOW_OFLAG_ZERO:
        return EXT_ZERO
    if e & L2E_OFFSET_MASK:
        return EXT_DATA
    return EXT_UNALLOCATED


cdef inline uint64_t rc_get(const uint8_t *blk, int64_t i, int order) noexcept nogil:
    """Refcount entry ``i`` of a refcount block in on-disk form."""
    cdef int shift
    if order == 4:
        return QF_BSWAP16((<const uint16_t *>blk)[i])
    elif order == 3:
        return blk[i]
    elif order == 5:
        return QF_BSWAP32((<const uint32_t *>blk)[i])
    elif order == 6:
        return QF_BSWAP64((<const uint64_t *>blk)[i])
    # Sub-byte widths: entry i lives in byte i >> (3 - order), LSB first.
    shift = (i & ((8 >> order) - 1)) << order
    return (blk[i >> (3 - order)] >> shift) & ((1 << (1 << order)) - 1)


cdef inline void rc_set(uint8_t *blk, int64_t i, int order, uint64_t v) noexcept nogil:
    """Store refcount ``v`` (already checked to fit) into entry ``i``."""
    cdef int shift
    cdef uint8_t mask
    if order == 4:
        (<uint16_t *>blk)[i] = QF_BSWAP16(<uint16_t>v)
    elif order == 3:
        blk[i] = <uint8_t>v
    elif order == 5:
        (<uint32_t *>blk)[i] = QF_BSWAP32(<uint32_t>v)
    elif order == 6:
        (<uint64_t *>blk)[i] = QF_BSWAP64(v)
    else:
        shift = (i & ((8 >> order) - 1)) << order
        mask = <uint8_t>(((1 << (1 << order)) - 1) << shift)
        blk[i >> (3 - order)] = <uint8_t>((blk[i >> (3 - order)] & ~mask) | ((v << shift) & mask))


cdef inline bint at_host0(uint64_t e, bint data0) noexcept nogil:
    """An entry of an image with an external data file (``data0``) that maps
    its cluster to host offset 0: COPIED tells it from an unallocated one
    (qemu's qcow2_get_cluster_type; data clusters there have refcount 1)."""
    return data0 and (e & (QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO
                           | L2E_OFFSET_MASK)) == QCOW_OFLAG_COPIED


cdef inline int64_t l2_run(const uint64_t *l2, int64_t i, int64_t count, int cluster_bits,
                           bint need_copied, int *kind, uint64_t *host,
                           bint data0=False) noexcept nogil:
    """Length of the run of entries l2[i:i+count] that share the first one's
    kind and, for data and preallocated zero clusters, map contiguous host
    clusters (and, for data if ``need_copied``, all carry QCOW_OFLAG_COPIED).  Returns at least 1; sets
    ``kind`` and, for data, ``host`` (the first host offset).  A data entry
    whose host offset is not cluster-aligned is EXT_INVALID.  ``data0``:
    the image has an external data file (see at_host0)."""
    cdef uint64_t e = l2[i], cs = (<uint64_t>1) << cluster_bits, want, copied
    cdef int k = l2_entry_kind(e)
    cdef int64_t n = 1
    if k == EXT_UNALLOCATED and at_host0(e, data0):
        k = EXT_DATA
    if k == EXT_DATA and (e & L2E_OFFSET_MASK) & (cs - 1):
        k = EXT_INVALID
    kind[0] = k
    host[0] = e & L2E_OFFSET_MASK
    if k == EXT_DATA:
        copied = e & QCOW_OFLAG_COPIED
        if need_copied and not copied:
            return 1
        want = host[0] + cs
        while n < count:
            e = l2[i + n]
            if (e & (QCOW_OFLAG_COMPRESSED | L2E_STD_RESERVED_MASK | QCOW_OFLAG_ZERO)) \
                    or (e & L2E_OFFSET_MASK) != want or (e & QCOW_OFLAG_COPIED) != copied:
                break
            want += cs
            n += 1
    elif k == EXT_ZERO and host[0]:
        # Preallocated zero clusters: a run keeps its host clusters contiguous.
        want = host[0] + cs
        while n < count and l2_entry_kind(l2[i + n]) == EXT_ZERO and \
                (l2[i + n] & L2E_OFFSET_MASK) == want:
            want += cs
            n += 1
    elif k == EXT_ZERO:
        while n < count and l2_entry_kind(l2[i + n]) == EXT_ZERO and \
                not (l2[i + n] & L2E_OFFSET_MASK):
            n += 1
    elif k == EXT_UNALLOCATED:
        while n < count and l2_entry_kind(l2[i + n]) == k and not at_host0(l2[i + n], data0):
            n += 1
    return n


# -- extended L2 entries (subclusters) ------------------------------------------
#
# An extended entry is two words: the descriptor (as a standard entry, bit 0
# ignored) and the subcluster bitmap: bit sc = subcluster sc allocated, bit
# SC_ZERO_SHIFT + sc = subcluster sc reads as zeros.  ``u`` below indexes
# subclusters across a slice: entry u >> SC_BITS, subcluster u & (SUBCLUSTERS - 1).

cdef inline int sc_kind(uint64_t e, uint64_t bitmap, int sc, int cluster_bits,
                        bint data0=False) noexcept nogil:
    """Kind of subcluster ``sc`` of the extended entry (e, bitmap), with
    qemu's validity rules: a compressed cluster has no bitmap; no subcluster
    is both allocated and zero; allocated ones need a host offset; a host
    offset must be cluster-aligned."""
    cdef uint64_t host = e & L2E_OFFSET_MASK
    if e & QCOW_OFLAG_COMPRESSED:
        return EXT_INVALID if bitmap else EXT_COMPRESSED
    if (e & L2E_STD_RESERVED_MASK) or ((bitmap >> SC_ZERO_SHIFT) & bitmap & SC_ALLOC_MASK) \
            or (host & (((<uint64_t>1) << cluster_bits) - 1)) \
            or (host == 0 and (bitmap & SC_ALLOC_MASK) and not at_host0(e, data0)):
        return EXT_INVALID
    if (bitmap >> sc) & 1:
        return EXT_DATA
    if (bitmap >> (SC_ZERO_SHIFT + sc)) & 1:
        return EXT_ZERO
    return EXT_UNALLOCATED


cdef inline int64_t l2_run_ext(const uint64_t *l2, int64_t u, int64_t count, int cluster_bits,
                               bint need_copied, int *kind, uint64_t *host,
                               bint data0=False) noexcept nogil:
    """l2_run for extended entries, in subclusters: the run of subclusters
    u, u+1, ... (at most ``count``) sharing the first one's kind; data runs
    are host-contiguous (and all COPIED if ``need_copied``); zero and
    unallocated runs keep a host offset (qemu's ZERO_ALLOC, UNALLOCATED_ALLOC)
    only if every subcluster's cluster has one, contiguous.
    Sets ``host`` to the first subcluster's host offset (0 if none; for
    compressed, the raw descriptor's offset bits)."""
    cdef int scb = qcow2_unit_bits(cluster_bits, True)
    cdef int64_t i = u >> SC_BITS, n = 1, j
    cdef int sc = <int>(u & (SUBCLUSTERS - 1)), k, k2
    cdef uint64_t e = l2[2 * i], bm = l2[2 * i + 1], base, want, copied
    cdef bint mapped0, mapped           # the cluster has a host cluster (at_host0: offset 0)
    k = sc_kind(e, bm, sc, cluster_bits, data0)
    kind[0] = k
    base = e & L2E_OFFSET_MASK
    mapped0 = base != 0 or at_host0(e, data0)
    mapped = mapped0
    host[0] = base + ((<uint64_t>sc) << scb) if mapped0 and k != EXT_COMPRESSED else base
    if k == EXT_INVALID or k == EXT_COMPRESSED:
        if k == EXT_COMPRESSED:       # the rest of the cluster
            n = SUBCLUSTERS - sc
            if n > count:
                n = count
        return n
    copied = e & QCOW_OFLAG_COPIED
    if k == EXT_DATA and need_copied and not copied:
        return 1
    want = host[0] + ((<uint64_t>1) << scb)
    while n < count:
        j = u + n
        if (j & (SUBCLUSTERS - 1)) == 0:
            e = l2[2 * (j >> SC_BITS)]
            bm = l2[2 * (j >> SC_BITS) + 1]
            base = e & L2E_OFFSET_MASK
            mapped = base != 0 or at_host0(e, data0)
        k2 = sc_kind(e, bm, <int>(j & (SUBCLUSTERS - 1)), cluster_bits, data0)
        if k2 != k:
            break
        if k == EXT_DATA:
            if (base + ((<uint64_t>(j & (SUBCLUSTERS - 1))) << scb)) != want or (e & QCOW_OFLAG_COPIED) != copied:
                break
        else:       # zero or unallocated: a host offset kept only if contiguous
            if mapped0 != mapped:
                break
            if mapped0 and (base + ((<uint64_t>(j & (SUBCLUSTERS - 1))) << scb)) != want:
                break
        want += (<uint64_t>1) << scb
        n += 1
    return n


cdef inline int64_t l2_units_run(const uint64_t *l2, int64_t u, int64_t count, int cluster_bits,
                                 bint extended, bint need_copied, int *kind,
                                 uint64_t *host, bint data0=False) noexcept nogil:
    """The run at allocation unit ``u`` of a slice: clusters (l2_run), or
    subclusters with extended L2 entries (l2_run_ext).  ``data0``: the
    image has an external data file (at_host0)."""
    if extended:
        return l2_run_ext(l2, u, count, cluster_bits, need_copied, kind, host, data0)
    return l2_run(l2, u, count, cluster_bits, need_copied, kind, host, data0)
