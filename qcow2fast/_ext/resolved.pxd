from libc.stdint cimport uint64_t, int64_t
from .cache cimport TableCache

# The resolved-mapping cache of a backing chain (resolved.pyx).  The guest
# disk is cut into units of 2**unit_bits bytes (the smallest allocation
# unit of any qcow2 layer of the chain, so that each layer's answer is the
# same across a unit) and blocks of RM_BLOCK_UNITS units; a block's entries
# are resolved together.  An entry is two words: the host offset of the
# unit's first byte (RM_DATA), and meta = layer << 8 | kind.
cdef enum:
    RM_BLOCK_BITS = 8
    RM_BLOCK_UNITS = 256
    RM_PENDING = 0       # not resolved yet (only while its block is being resolved)
    RM_DATA = 1          # data of ``layer`` at ``host``
    RM_ZERO = 2          # zeros: a zero cluster of ``layer``, past ``layer``'s end, or
                         # unallocated all the way down (layer = the chain's depth)
    RM_SLOW = 3          # ``layer`` must read it through its Python path (compressed, malformed)
    RM_WALK = 4          # a layer's end lies inside the unit: walked byte by byte on each read


cdef inline uint64_t rm_meta(int layer, int kind) noexcept nogil:
    return ((<uint64_t>layer) << 8) | <uint64_t>kind


cdef class ResolvedMap:
    cdef readonly int unit_bits
    cdef readonly TableCache blocks      # one slot = the entries of one block
    cdef public uint64_t hits, misses    # blocks found / resolved

    cdef uint64_t *find(self, int64_t block) noexcept nogil
    cdef uint64_t *add(self, int64_t block) except NULL
    cdef void discard(self, int64_t block)
