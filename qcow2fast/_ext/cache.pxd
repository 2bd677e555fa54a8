from cpython cimport array
from libc.stdint cimport uint8_t, int32_t, int64_t, uint64_t
from .fileio cimport File

cdef class TableCache:
    cdef readonly int nslots
    cdef readonly int64_t slot_bytes
    cdef readonly object data           # memoryview of bytes [nslots, slot_bytes]
    cdef readonly File file
    cdef readonly bint swap64           # entries are 64-bit big-endian on disk
    cdef public TableCache depends      # flushed before any slot of this cache is written
    cdef public object barrier          # makes completed writes stable; called before a slot
                                        # is written while ``barrier_pending`` (None: never)
    cdef public bint barrier_pending    # an entry changed since the last barrier (qemu's
                                        # depends_on_flush): what it points to may not be stable
    cdef public uint64_t hits, misses
    cdef readonly int ndirty
    cdef object _raw_views, _u64_views
    cdef object _mm, _scratch_mm
    cdef array.array _keys, _lru, _dirty, _dlo, _dhi, _pins, _htab, _free  # never resized
    cdef int64_t granule
    cdef uint8_t *base
    cdef int64_t *keys
    cdef uint64_t *lru
    cdef uint8_t *dirty
    cdef int64_t *dlo                   # a dirty slot's changed bytes: [dlo, dhi)
    cdef int64_t *dhi
    cdef int32_t *pins
    cdef int32_t *htab
    cdef int32_t *freelist
    cdef int nfree
    cdef uint64_t hmask
    cdef int hshift                     # 64 - log2(hash capacity)
    cdef uint64_t clock
    cdef uint8_t *scratch

    cdef int lookup(self, int64_t key) noexcept nogil
    cdef void _hinsert(self, int slot) noexcept nogil
    cdef void _hremove(self, int slot) noexcept nogil
    cdef int _victim(self) except -1
    cdef void _drop(self, int slot)
    cdef uint8_t *slot_ptr(self, int slot) noexcept nogil
    cdef void c_mark_dirty(self, int slot) noexcept
    cdef void c_mark_dirty_range(self, int slot, int64_t lo, int64_t hi,
                                 bint ordered=*) noexcept
    cdef int c_load(self, int64_t key, bint read) except -1
    cdef int c_writeback(self, int slot) except -1
