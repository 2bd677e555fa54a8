# cython: language_level=3
"""Metadata table cache (qemu's qcow2-cache.c): fixed slots in one anonymous
mapping, LRU eviction, a hash from the table's host offset to its slot.

Invariants:
- a slot is either empty (key -1, on the free list) or holds exactly one
  table slice, found by its host offset through the hash;
- a dirty slot is written back before it is reused, and before it is
  written the ``depends`` cache is flushed (refcount blocks before the L2
  tables that rely on them);
- no slot is written while an entry changed since the last ``barrier``
  (``barrier_pending``, qemu's depends_on_flush): an entry is changed only
  after what it points to was written (new data, a new table), and the
  barrier makes that stable first -- with the ``depends`` cache's blocks --
  so an L2 entry never reaches the disk before its data, even where lazy
  refcounts leave ``depends`` unset.  One barrier covers a whole batch of
  slots (a flush, an eviction run).  The one change that needs no barrier
  (``ordered=False``): under lazy refcounts, an entry pointing into fresh
  space whose zeros are already stable, where the guest saw zeros before,
  so losing the data there loses nothing the guest was promised;
- a dirty slot's changed bytes lie in [dlo, dhi); write-back writes that
  range rounded out to whole 4 KiB blocks (or the whole slice if smaller),
  not the whole slice: under O_DIRECT and in sync modes a 4 KiB write costs
  less than a 64 KiB one (qemu writes whole cache entries);
- a pinned slot is never evicted.
"""

import mmap

from cpython cimport array
from libc.stdint cimport uint8_t, int32_t, int64_t, uint64_t
from libc.string cimport memset, memcpy

from .common cimport QF_BSWAP64
from .fileio cimport File


# Write-back granule: the page size, and O_DIRECT's block size.
cdef enum:
    WRITE_GRANULE = 4096


cdef array.array _filled(str typecode, Py_ssize_t n, long value):
    """An ``array(typecode)`` of ``n`` items, each ``value``."""
    cdef array.array a = array.clone(array.array(typecode), n, zero=True)
    if value:
        a[:] = array.array(typecode, [value]) * n
    return a


cdef inline uint64_t _hash(int64_t key, int shift) noexcept nogil:
    """Fibonacci hashing: the product's top bits.  (Its low bits depend only
    on the key's, which are zero for cluster-aligned tables: masking them
    sent every 64 KiB table to one bucket in 128, 30-odd probes a lookup
    in a full cache.)"""
    return (<uint64_t>key * 0x9E3779B97F4A7C15ULL) >> shift


cdef class TableCache:
    def __cinit__(self, File file, int nslots, int64_t slot_bytes, bint swap64):
        cdef int cap = 1, i
        if nslots < 1:
            raise ValueError("a cache needs at least one slot")
        self.file = file
        self.nslots = nslots
        self.slot_bytes = slot_bytes
        self.swap64 = swap64
        # An anonymous mapping is page-aligned and zero pages are mapped
        # lazily: a large cache costs memory only as it fills, and dropped
        # slots give their pages back (madvise).
        cdef uint8_t[::1] mem, scratch
        self._mm = mmap.mmap(-1, nslots * slot_bytes)
        mem = self._mm
        self.data = memoryview(self._mm).cast("B", (nslots, slot_bytes))
        self._keys = _filled("q", nslots, -1)
        self._lru = _filled("Q", nslots, 0)
        self._dirty = _filled("B", nslots, 0)
        self._dlo = _filled("q", nslots, 0)
        self._dhi = _filled("q", nslots, 0)
        self._pins = _filled("i", nslots, 0)
        while cap < 2 * nslots:
            cap <<= 1
        self._htab = _filled("i", cap, -1)
        self._free = array.array("i", range(nslots - 1, -1, -1))
        # Page-aligned like the slots, so O_DIRECT writes need no bounce buffer.
        self._scratch_mm = mmap.mmap(-1, slot_bytes)
        scratch = self._scratch_mm
        self.granule = min(max(WRITE_GRANULE, file.align), slot_bytes)
        # The arrays are never resized and the mappings never closed, so
        # these pointers stay valid for the cache's life.
        self.base = &mem[0]
        self.keys = <int64_t *>self._keys.data.as_longlongs
        self.lru = <uint64_t *>self._lru.data.as_ulonglongs
        self.dirty = self._dirty.data.as_uchars
        self.dlo = <int64_t *>self._dlo.data.as_longlongs
        self.dhi = <int64_t *>self._dhi.data.as_longlongs
        self.pins = <int32_t *>self._pins.data.as_ints
        self.htab = <int32_t *>self._htab.data.as_ints
        self.freelist = <int32_t *>self._free.data.as_ints
        self.scratch = &scratch[0]
        self.nfree = nslots
        self.hmask = cap - 1
        self.hshift = 64
        while cap > 1:
            cap >>= 1
            self.hshift -= 1
        # One view per slot, made once: slow paths ask for them constantly.
        flat = memoryview(self._mm)
        self._raw_views = [flat[i * slot_bytes:(i + 1) * slot_bytes] for i in range(nslots)]
        self._u64_views = [v.cast("Q") for v in self._raw_views] if swap64 else None

    # -- hash (linear probing, backward-shift deletion) ----------------------

    cdef int lookup(self, int64_t key) noexcept nogil:
        cdef uint64_t h = _hash(key, self.hshift)
        cdef int32_t s
        while True:
            s = self.htab[h]
            if s < 0:
                return -1
            if self.keys[s] == key:
                # Only a new most recent slot is stamped: threads sharing
                # the lock and one slot then write nothing shared here.
                if self.lru[s] != self.clock:
                    self.clock += 1
                    self.lru[s] = self.clock
                return s
            h = (h + 1) & self.hmask

    cdef void _hinsert(self, int slot) noexcept nogil:
        cdef uint64_t h = _hash(self.keys[slot], self.hshift)
        while self.htab[h] >= 0:
            h = (h + 1) & self.hmask
        self.htab[h] = slot

    cdef void _hremove(self, int slot) noexcept nogil:
        cdef uint64_t h = _hash(self.keys[slot], self.hshift)
        cdef uint64_t j, home
        while self.htab[h] != slot:
            h = (h + 1) & self.hmask
        j = h
        while True:
            self.htab[h] = -1
            while True:
                j = (j + 1) & self.hmask
                if self.htab[j] < 0:
                    return
                home = _hash(self.keys[self.htab[j]], self.hshift)
                # Move entry j back into the hole at h unless its home lies
                # cyclically in (h, j].
                if h <= j:
                    if h < home <= j:
                        continue
                else:
                    if home > h or home <= j:
                        continue
                break
            self.htab[h] = self.htab[j]
            h = j

    cdef uint8_t *slot_ptr(self, int slot) noexcept nogil:
        return self.base + <int64_t>slot * self.slot_bytes

    # -- loading and writing back --------------------------------------------

    cdef int _victim(self) except -1:
        cdef int i, best = -1
        cdef uint64_t best_lru = 0
        if self.nfree > 0:
            self.nfree -= 1
            return self.freelist[self.nfree]
        for i in range(self.nslots):
            if self.pins[i] == 0 and (best < 0 or self.lru[i] < best_lru):
                best = i
                best_lru = self.lru[i]
        if best < 0:
            raise RuntimeError("metadata cache: every slot is in use")
        if self.dirty[best]:
            self.c_writeback(best)
        self._hremove(best)
        self.keys[best] = -1
        return best

    cdef int c_load(self, int64_t key, bint read) except -1:
        """Slot holding the slice at host offset ``key``, loading it if needed
        (or zero-filling it when ``read`` is false: a new table)."""
        cdef int slot = self.lookup(key)
        cdef int64_t rc, i, n
        cdef uint64_t *p
        cdef uint8_t *ptr
        if slot >= 0:
            self.hits += 1
            return slot
        self.misses += 1
        slot = self._victim()
        ptr = self.slot_ptr(slot)
        if read:
            with nogil:
                rc = self.file.c_pread(<char *>ptr, self.slot_bytes, key)
                if rc >= 0 and self.swap64:
                    p = <uint64_t *>ptr
                    n = self.slot_bytes // 8
                    for i in range(n):
                        p[i] = QF_BSWAP64(p[i])
            if rc < 0:
                self.freelist[self.nfree] = slot
                self.nfree += 1
                self.file.raise_errno(rc, "metadata read", key)
        else:
            memset(ptr, 0, self.slot_bytes)
        self.keys[slot] = key
        self.clock += 1
        self.lru[slot] = self.clock
        self._hinsert(slot)
        return slot

    cdef int c_writeback(self, int slot) except -1:
        cdef int64_t rc, i, n, g = self.granule
        cdef int64_t lo = self.dlo[slot] & ~(g - 1), hi = (self.dhi[slot] + g - 1) & ~(g - 1)
        cdef uint64_t *src
        cdef uint64_t *dst
        cdef const char *out
        if not self.dirty[slot]:
            return 0
        if self.depends is not None and self.depends.ndirty > 0:
            # Refcounts must be on disk before the table that needs them.
            self.depends.flush()
            self.barrier_pending = True
        if self.barrier_pending:
            # What the changed entries point to, stable before they are written.
            self.barrier_pending = False
            if self.barrier is not None:
                self.barrier()
        out = <const char *>self.slot_ptr(slot) + lo
        with nogil:
            if self.swap64:
                src = <uint64_t *>(self.slot_ptr(slot) + lo)
                dst = <uint64_t *>self.scratch
                n = (hi - lo) // 8
                for i in range(n):
                    dst[i] = QF_BSWAP64(src[i])
                out = <const char *>self.scratch
            rc = self.file.c_pwrite(out, hi - lo, self.keys[slot] + lo)
        if rc < 0:
            self.file.raise_errno(rc, "metadata write", self.keys[slot] + lo)
        self.dirty[slot] = 0
        self.ndirty -= 1
        return 0

    # -- Python interface ----------------------------------------------------

    def load(self, int64_t key):
        """Slot of the slice at host offset ``key`` (read from disk on a miss)."""
        return self.c_load(key, True)

    def new(self, int64_t key):
        """Slot for a new, zero-filled slice at ``key``, marked dirty."""
        cdef int slot = self.lookup(key)
        if slot < 0:
            slot = self.c_load(key, False)
        else:
            memset(self.slot_ptr(slot), 0, self.slot_bytes)
        self.mark_dirty(slot)
        return slot

    def find(self, int64_t key):
        """Slot of ``key`` if cached, else -1 (no I/O)."""
        return self.lookup(key)

    def probe_length(self, int64_t key):
        """How many hash buckets a lookup of ``key`` reads (a cached key's
        cost; for the hash's tests and statistics)."""
        cdef uint64_t h = _hash(key, self.hshift)
        cdef int n = 1
        while self.htab[h] >= 0 and self.keys[self.htab[h]] != key:
            h = (h + 1) & self.hmask
            n += 1
        return n

    cdef void c_mark_dirty(self, int slot) noexcept:
        self.c_mark_dirty_range(slot, 0, self.slot_bytes)

    cdef void c_mark_dirty_range(self, int slot, int64_t lo, int64_t hi,
                                 bint ordered=True) noexcept:
        """Bytes [lo, hi) of the slot changed; ``ordered=False``: the new
        entries need no barrier before they are written (they point only
        where a power loss leaves what the guest saw before: see
        ``ImageState.grow_durable``)."""
        if ordered:
            self.barrier_pending = True
        if not self.dirty[slot]:
            self.dirty[slot] = 1
            self.ndirty += 1
            self.dlo[slot] = lo
            self.dhi[slot] = hi
            return
        if lo < self.dlo[slot]:
            self.dlo[slot] = lo
        if hi > self.dhi[slot]:
            self.dhi[slot] = hi

    def mark_dirty(self, int slot, int64_t lo=0, int64_t hi=-1):
        """Bytes [lo, hi) of the slot changed (all of it by default)."""
        if hi < 0:
            hi = self.slot_bytes
        if not 0 <= lo < hi <= self.slot_bytes:
            raise ValueError(f"dirty range [{lo}, {hi}) outside a {self.slot_bytes}-byte slot")
        self.c_mark_dirty_range(slot, lo, hi)

    def writeback(self, int slot):
        """Write one slot now if it is dirty (dependencies first)."""
        self.c_writeback(slot)

    def is_dirty(self, int slot):
        return bool(self.dirty[slot])

    def pin(self, int slot):
        self.pins[slot] += 1

    def unpin(self, int slot):
        self.pins[slot] -= 1

    def u64(self, int slot):
        """The slot as a native uint64 ``memoryview`` (L2 slices); wrap it in
        ``numpy.asarray`` for vector work."""
        return self._u64_views[slot]

    def raw(self, int slot):
        """The slot as a ``memoryview`` of bytes (refcount blocks)."""
        return self._raw_views[slot]

    def key(self, int slot):
        return self.keys[slot]

    def flush(self):
        """Write every dirty slot, in host-offset order.  No fdatasync: the
        caller places the barrier."""
        cdef int i
        order = sorted((self.keys[i], i) for i in range(self.nslots) if self.dirty[i])
        for _, i in order:
            self.c_writeback(i)

    cdef void _drop(self, int slot):
        if self.dirty[slot]:
            self.dirty[slot] = 0
            self.ndirty -= 1
        self._hremove(slot)
        self.keys[slot] = -1
        self.lru[slot] = 0
        self.freelist[self.nfree] = slot
        self.nfree += 1

    def invalidate_all(self):
        cdef int i
        for i in range(self.nslots):
            if self.keys[i] >= 0:
                self._drop(i)

    def drop_unused(self, uint64_t since_clock):
        """Drop clean, unpinned slices not used since ``since_clock`` and give
        their memory back (cache-clean-interval).  Returns how many."""
        cdef int i, n = 0
        for i in range(self.nslots):
            if (self.keys[i] >= 0 and not self.dirty[i] and self.pins[i] == 0
                    and self.lru[i] <= since_clock):
                self._drop(i)
                n += 1
        if n:
            self._release_free_memory()
        return n

    def _release_free_memory(self):
        cdef int i
        cdef int64_t start
        if self.slot_bytes % mmap.PAGESIZE:
            return
        for i in range(self.nfree):
            start = <int64_t>self.freelist[i] * self.slot_bytes
            self._mm.madvise(mmap.MADV_DONTNEED, start, self.slot_bytes)

    def mark(self):
        """A mark for drop_unused: every slot used after this call has a
        later clock.  (The clock moves on, so that the most recent slot --
        which lookup stamps only once -- is stamped again on its next use.)"""
        self.clock += 1
        return self.clock - 1

    @property
    def used(self):
        return self.nslots - self.nfree
