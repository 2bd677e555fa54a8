# The cached L2 slice mapping a guest offset: the lookup of the data path,
# shared by the one-request loops (core.pyx) and the batch engine
# (batch.pyx).  Inline: cimported, never copied.
from libc.stdint cimport uint64_t, int64_t
from .common cimport L1E_OFFSET_MASK, L1E_RESERVED_MASK, SC_BITS, SUBCLUSTERS
from .state cimport ImageState

# slice_lookup results.
cdef enum:
    SLICE_OK = 0
    L1_UNALLOCATED = 1
    MISS = 2            # the slice is not cached: only an exclusive holder may load it
    BAD = 3             # a malformed L1 entry: the slow path reports it


cdef inline void slice_point(ImageState s, int slot, int64_t pos, uint64_t **l2,
                             int64_t *l2i) noexcept nogil:
    """``l2``/``l2i``: cache slot ``slot``'s slice and the index in it of
    the allocation unit (cluster or subcluster) holding guest ``pos``."""
    cdef int64_t i = (pos >> s.cluster_bits) & ((1 << s.l2_bits) - 1)
    l2[0] = <uint64_t *>s.l2_cache.slot_ptr(slot)
    l2i[0] = i & ((1 << s.slice_bits) - 1)
    if s.extended:
        l2i[0] = (l2i[0] << SC_BITS) | ((pos >> s.unit_bits) & (SUBCLUSTERS - 1))


cdef inline int slice_lookup(ImageState s, int64_t pos, uint64_t **l2, int64_t *l2i,
                             int *slot_out, uint64_t *l1e_out, int64_t *key_out) noexcept nogil:
    """Find the cached L2 slice mapping guest ``pos`` (see slice_point).
    Returns SLICE_OK, L1_UNALLOCATED, BAD, or MISS with ``key_out`` set to
    the slice's key for TableCache.c_load."""
    cdef int64_t cidx = pos >> s.cluster_bits
    cdef int64_t l1i = cidx >> s.l2_bits
    cdef int64_t i = cidx & ((1 << s.l2_bits) - 1)
    cdef uint64_t l1e, l2off
    cdef int slot
    if l1i >= s.l1_size:
        return BAD
    l1e = s.l1[l1i]
    l1e_out[0] = l1e
    if l1e & L1E_RESERVED_MASK:
        return BAD
    l2off = l1e & L1E_OFFSET_MASK
    if l2off == 0:
        return L1_UNALLOCATED
    if (l2off & (s.cluster_size - 1)) or l2off + s.cluster_size > <uint64_t>s.host_limit:
        return BAD
    key_out[0] = l2off + (i >> s.slice_bits) * s.slice_bytes
    slot = s.l2_cache.lookup(key_out[0])
    if slot < 0:
        return MISS
    s.l2_cache.hits += 1
    slice_point(s, slot, pos, l2, l2i)
    slot_out[0] = slot
    return SLICE_OK
