# cython: language_level=3
"""The resolved-mapping cache of a backing chain: for each unit of the
guest disk, what the chain below the top image shows there -- which layer
holds it and at which host offset, zeros (a zero cluster, past a layer's
end, or unallocated all the way down), or "ask that layer's Python path"
(compressed clusters).  A cached read at depth 1000 then costs one lookup
here, as at depth 1.

Storage is a ``TableCache`` (one slot per block of RM_BLOCK_UNITS entries,
LRU, one hash lookup per request): the cache's memory is its slots, fixed
when the chain is opened, however deep the chain is.  Its slots are never
dirty, so the file it is given is never written.

What invalidates what: an entry depends only on the layers below the top,
which are read-only while they are backing files.  Writes to the top never
touch it.  Whatever changes a lower layer or the chain's shape (commit
writing into a lower layer, rebase changing a backing file) must call
``ChainCore.invalidate`` for the guest range it changed, before the changed
layer is read again through the chain.  The locking is the chain's
(chain.pyx): lookups under its shared lock, resolution and invalidation
under its exclusive lock.
"""

from libc.stdint cimport uint64_t, int64_t

from .cache cimport TableCache
from .fileio cimport File

BLOCK_UNITS = RM_BLOCK_UNITS
ENTRY_BYTES = 16
KIND_NAMES = {RM_DATA: "data", RM_ZERO: "zero", RM_SLOW: "slow", RM_WALK: "walk"}


cdef inline int64_t _key(int64_t block) noexcept nogil:
    # TableCache hashes key >> 9 (keys are host offsets there).
    return block << 9


cdef class ResolvedMap:
    def __cinit__(self, File file, int unit_bits, int64_t budget_bytes):
        """Entries for units of 2**unit_bits bytes in at most ``budget_bytes``
        (at least two blocks).  ``file``: any open file (never written)."""
        cdef int64_t slot_bytes = RM_BLOCK_UNITS * 16
        if not 9 <= unit_bits <= 40:
            raise ValueError(f"unit_bits {unit_bits} out of range")
        self.unit_bits = unit_bits
        self.blocks = TableCache(file, max(2, budget_bytes // slot_bytes), slot_bytes, False)

    cdef uint64_t *find(self, int64_t block) noexcept nogil:
        cdef int slot = self.blocks.lookup(_key(block))
        if slot < 0:
            return NULL
        self.hits += 1
        return <uint64_t *>self.blocks.slot_ptr(slot)

    cdef uint64_t *add(self, int64_t block) except NULL:
        """A zeroed (all RM_PENDING) slot for ``block``, evicting the least
        recently used one."""
        self.misses += 1
        return <uint64_t *>self.blocks.slot_ptr(self.blocks.c_load(_key(block), False))

    cdef void discard(self, int64_t block):
        cdef int slot = self.blocks.lookup(_key(block))
        if slot >= 0:
            self.blocks._drop(slot)

    def invalidate(self, int64_t offset=0, length=None):
        """Forget every entry of guest [offset, offset+length) (all of them
        by default)."""
        cdef int i
        cdef int64_t first, last, key, span = (<int64_t>RM_BLOCK_UNITS) << self.unit_bits
        if length is None:
            self.blocks.invalidate_all()
            return
        if length <= 0:
            return
        first = offset // span
        last = (offset + length - 1) // span
        for i in range(self.blocks.nslots):
            key = self.blocks.keys[i]
            if key >= 0 and first <= (key >> 9) <= last:
                self.blocks._drop(i)

    def entry(self, int64_t offset):
        """The cached answer for guest ``offset``: (kind name, layer, host
        offset of that byte), or None if its block is not cached."""
        cdef int64_t u = offset >> self.unit_bits
        cdef uint64_t *e = self.find(u >> RM_BLOCK_BITS)
        if e == NULL:
            return None
        e += 2 * (u & (RM_BLOCK_UNITS - 1))
        kind = <int>(e[1] & 0xff)
        if kind == RM_PENDING:
            return None
        host = e[0] + (offset & ((1 << self.unit_bits) - 1)) if kind == RM_DATA else None
        return KIND_NAMES[kind], <int>(e[1] >> 8), host

    @property
    def block_bytes(self):
        """Guest bytes one block of entries covers."""
        return RM_BLOCK_UNITS << self.unit_bits

    @property
    def nslots(self):
        return self.blocks.nslots

    @property
    def used(self):
        return self.blocks.used

    @property
    def nbytes(self):
        """Memory of the entries (the cache's budget)."""
        return self.blocks.nslots * self.blocks.slot_bytes
