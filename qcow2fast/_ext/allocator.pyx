# cython: language_level=3
"""The per-cluster half of the refcount subsystem: searching refcount
blocks for free runs and adding to refcounts, in C.  ``RefcountCore`` is the
base class of :class:`qcow2fast.engine.refcount.Refcounts`, which does the rare
structural work (creating refcount blocks, growing the table) in Python.

A missing refcount block reads as all zeros (every cluster it would cover
is free).  Raising a refcount that needs a missing block is not done here:
the caller creates the block and retries.
"""

from libc.stdint cimport uint8_t, uint64_t, int64_t

from .cache cimport TableCache
from .common cimport qcow2_rb_bits, rc_get, rc_set

from ..errors import CorruptImageError, LimitExceededError


cdef class RefcountCore:
    def _rc_setup(self, TableCache cache, int cluster_bits, int order):
        self.cache = cache
        self.cluster_bits = cluster_bits
        self.order = order
        self.rb_bits = qcow2_rb_bits(cluster_bits, order)
        self.maxval = (<uint64_t>-1) >> (64 - (1 << order))
        self.missing_block = -1
        self.res = NULL
        self.res_len = 0

    @property
    def table(self):
        """The refcount table (native uint64 array); change it in place or
        replace it with :meth:`_set_table`."""
        return self._table

    def _set_table(self, table):
        """Install ``table`` (contiguous native uint64: an ``array('Q')`` or a
        numpy array); it stays exported (cannot be resized) until replaced."""
        cdef uint64_t[::1] view = table
        self._table = table
        self._table_view = view
        self.tbl = &view[0] if view.shape[0] else NULL
        self.table_size = view.shape[0]

    @property
    def reserved(self):
        """Clusters never to hand out (one byte per cluster, nonzero =
        reserved: a numpy bool array during repair) or None."""
        return self._reserved

    @reserved.setter
    def reserved(self, value):
        cdef const uint8_t[::1] view
        if value is None:
            self._reserved, self._reserved_view, self.res, self.res_len = None, None, NULL, 0
            return
        if getattr(value, "dtype", None) is not None:       # numpy bool: one byte each
            value = value.view("u1") if value.flags.c_contiguous else value.astype("u1")
        view = value
        self._reserved, self._reserved_view = value, view
        self.res = &view[0] if view.shape[0] else NULL
        self.res_len = view.shape[0]

    cdef int _slot(self, int64_t t) except -2:
        """Cache slot of refcount block ``t``, or -1 if the block does not exist."""
        if t >= self.table_size or self.tbl[t] == 0:
            return -1
        return self.cache.c_load(self.tbl[t], True)

    cdef int64_t c_next_free(self, int64_t c) except -2:
        """The first free, unreserved cluster at or after ``c``."""
        cdef int64_t t, i, E = (<int64_t>1) << self.rb_bits
        cdef const uint8_t *blk
        cdef int slot
        while True:
            t = c >> self.rb_bits
            slot = self._slot(t)
            if slot >= 0:
                blk = self.cache.slot_ptr(slot)
                i = c & (E - 1)
                while i < E and rc_get(blk, i, self.order) != 0:
                    i += 1
                if i == E:
                    c = (t + 1) << self.rb_bits
                    continue
                c = (t << self.rb_bits) + i
            if c < self.res_len and self.res[c]:
                c += 1
                continue
            return c

    cdef int64_t c_free_run_at(self, int64_t c, int64_t want) except -2:
        """How many clusters from ``c`` (at most ``want``, within one block)
        are free and not reserved."""
        cdef int64_t E = (<int64_t>1) << self.rb_bits
        cdef int64_t i = c & (E - 1), lim = E - i, n = 0
        cdef const uint8_t *blk = NULL
        cdef int slot = self._slot(c >> self.rb_bits)
        if want < lim:
            lim = want
        if slot >= 0:
            blk = self.cache.slot_ptr(slot)
        while n < lim:
            if blk != NULL and rc_get(blk, i + n, self.order) != 0:
                break
            if c + n < self.res_len and self.res[c + n]:
                break
            n += 1
        return n

    cdef int64_t c_find_free_run(self, int64_t n) except -2:
        cdef int64_t start = self.c_next_free(self.free_hint), length = 0, got
        self.free_hint = start
        while length < n:
            got = self.c_free_run_at(start + length, n - length)
            if got == 0:
                start = self.c_next_free(start + length + 1)
                length = 0
            else:
                length += got
        return start

    cdef int64_t c_update(self, int64_t cluster, int64_t n, int64_t delta) except -2:
        """Add ``delta`` to refcounts [cluster, cluster+n).  Returns -1 when
        done, or the index of a refcount block that must be created first
        (nothing is changed then)."""
        cdef int64_t E = (<int64_t>1) << self.rb_bits
        cdef int64_t c, end = cluster + n, t, i, k, j, bad
        cdef uint64_t v
        cdef uint8_t *blk
        cdef int slot
        t = cluster >> self.rb_bits
        while t <= (end - 1) >> self.rb_bits:
            if t >= self.table_size or self.tbl[t] == 0:
                if delta < 0:
                    raise CorruptImageError(
                        f"freeing host cluster {(t << self.rb_bits) << self.cluster_bits:#x} "
                        "whose refcount block does not exist",
                        offset=max(cluster, t << self.rb_bits) << self.cluster_bits,
                        field="refcount")
                return t
            t += 1
        c = cluster
        while c < end:
            t = c >> self.rb_bits
            i = c & (E - 1)
            k = end - c if end - c < E - i else E - i
            slot = self._slot(t)
            blk = self.cache.slot_ptr(slot)
            bad = -1
            for j in range(i, i + k):
                v = rc_get(blk, j, self.order)
                if (delta < 0 and v < <uint64_t>(-delta)) or \
                        (delta > 0 and v > self.maxval - <uint64_t>delta):
                    bad = j
                    break
            if bad >= 0:
                host = ((t << self.rb_bits) + bad) << self.cluster_bits
                if delta < 0:
                    raise CorruptImageError(f"refcount of host cluster {host:#x} would drop "
                                            f"below zero (it is {v})", offset=host,
                                            field="refcount")
                raise LimitExceededError(f"refcount of host cluster {host:#x} would exceed the "
                                 f"{1 << self.order}-bit maximum {self.maxval}")
            for j in range(i, i + k):
                rc_set(blk, j, self.order, rc_get(blk, j, self.order) + <uint64_t>delta)
            self.cache.c_mark_dirty_range(slot, (i << self.order) >> 3,
                                          (((i + k) << self.order) + 7) >> 3)
            c += k
        if delta < 0 and cluster < self.free_hint:
            self.free_hint = cluster
        if end > self.end_cluster:
            self.end_cluster = end
        return -1

    cdef int64_t c_alloc(self, int64_t n) except -2:
        """Allocate ``n`` contiguous clusters (refcount 1) and return the
        first cluster index, or -1 when a refcount block must be created
        first (its index is left in ``missing_block``)."""
        cdef int64_t c = self.c_find_free_run(n)
        cdef int64_t t = self.c_update(c, n, 1)
        if t >= 0:
            self.missing_block = t
            return -1
        if c == self.free_hint:
            self.free_hint = c + n
        return c

    # -- Python interface ----------------------------------------------------

    def next_free(self, int64_t c):
        return self.c_next_free(c)

    def find_free_run(self, int64_t n):
        """Start of the first run of ``n`` free clusters (not yet taken)."""
        return self.c_find_free_run(n)

    def try_update(self, int64_t cluster, int64_t n, int64_t delta):
        return self.c_update(cluster, n, delta)

    def try_alloc(self, int64_t n):
        return self.c_alloc(n)
