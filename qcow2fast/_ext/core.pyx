# cython: language_level=3
"""The image's data path in C: reads and in-place overwrites resolved from
the cached L2 slices and transferred with one pread/pwrite per contiguous
host extent (the GIL released around the I/O), allocating writes that need
nothing copied but the layers below, and the backing-chain step.

``ImageCore`` is the base class of :class:`qcow2fast.engine.image.Image`;
the image's state is an :class:`ImageState` (``state.pyx``).  A request is
resolved run by run (``l2_units_run``): data runs go to the data file,
zero runs are memset, unallocated runs go to the backing-chain step
(``_fill_below``: chain.pyx, the whole chain resolved in C with a cache of
resolved mappings), not through Python.  What C does not
do (compressed clusters, copy-on-write of shared clusters, new L2 tables
and refcount blocks, malformed entries) is handed to the Python subsystems
through the hooks declared in ``core.pxd`` (``read_fallback``,
``write_fallback``, ``ordered_flush``, ``overlap_found``), and every write
first tells the write observers (``hooks.WriteObserver``).

Locking: readers and overwriters share ``rwlock`` (csrc/qf_rwlock.h:
readers count themselves on lines of their own); anything that changes
metadata or the cache holds it exclusively.  A shared holder that misses
the L2 cache drops the lock and retries exclusively, so cache loads and
evictions never race with a reader scanning a slice.  The shared lock is
tried with the GIL held and waited for with it released; the exclusive
lock is always waited for with the GIL released (so a holder waiting for
the GIL cannot deadlock with a waiter holding it).  Locks of a chain are
taken top layer first, never the other way.

(Over 600 lines on purpose: one cdef class in one module, because its
inline helpers ``_rdlock_fast`` and ``_slice_at`` are inlined only here; an
allocating-write half split into another module would call them through
the vtable on every request.)
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint64_t, int64_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

from .common cimport (l2_units_run, EXT_DATA, EXT_ZERO, EXT_UNALLOCATED, EXT_INVALID,
                      L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK,
                      QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, SC_ALLOC_MASK, SC_BITS,
                      SC_ZERO_SHIFT)
from .fileio cimport File
from .cache cimport TableCache
from .state cimport ImageState
from .allocator cimport RefcountCore
from .hooks cimport ChainStep, WriteObserver
from .l2slice cimport slice_lookup, slice_point, SLICE_OK, L1_UNALLOCATED, MISS, BAD

from ..errors import ImageClosedError, InvalidArgumentError, ReadOnlyImageError

# _read_loop/_write_loop result when a shared holder must retry exclusively
# (-2 is reserved for "exception raised").
cdef enum:
    NEED_EXCLUSIVE = -1



cdef class ImageCore:
    def __cinit__(self, *args, **kwargs):
        self.rwlock = qf_rw_new()
        if self.rwlock == NULL:
            raise MemoryError()
        self.s = None
        self.observers = []
        self.zeros = NULL
        self.scratch = NULL

    def __dealloc__(self):
        qf_rw_free(self.rwlock)
        free(self.zeros)
        free(self.scratch)

    # -- set-up by the Python layer -------------------------------------------

    def _attach(self, ImageState state):
        """Give the core its state (first thing at open)."""
        self.s = state

    def _core_setup(self, RefcountCore rc, ChainStep chain, int chain_first, read_fallback,
                    write_fallback, ordered_flush, overlap_found):
        """Attach the allocator (None when read-only), the backing chain
        below (a chain.ChainCore read from its layer ``chain_first`` down,
        or None) and the hooks (see core.pxd)."""
        cdef int64_t cs = self.s.cluster_size
        self.rc = rc
        self.chain_step = chain
        self.chain_first = chain_first
        self.read_fallback = read_fallback
        self.write_fallback = write_fallback
        self.ordered_flush = ordered_flush
        self.overlap_found = overlap_found
        free(self.zeros)
        self.zeros = NULL
        free(self.scratch)
        self.scratch = NULL
        if rc is None:
            return      # read-only (a layer of a chain, say): the buffers are for writes
        if posix_memalign(<void **>&self.zeros, 4096, cs) != 0:
            raise MemoryError()
        memset(self.zeros, 0, cs)
        if posix_memalign(<void **>&self.scratch, 4096, 2 * cs) != 0:
            raise MemoryError()

    @property
    def state(self):
        """The image's :class:`ImageState`."""
        return self.s

    @property
    def size(self):
        """The guest disk's size in bytes."""
        return self.s.size if self.s is not None else 0

    @property
    def read_only(self):
        return self.s is None or self.s.read_only

    @property
    def closed(self):
        return self.s is None or self.s.closed

    def add_write_observer(self, WriteObserver observer):
        """Tell ``observer`` of every guest range about to change (dirty
        bitmaps), from every write path."""
        # Appended in place (O(1): 65535 bitmaps): a _notify iterating the
        # list meanwhile may or may not tell the new one, as the write was
        # first.  Removal makes a new list, so an iteration never skips one.
        self._wrlock()
        try:
            self.observers.append(observer)
        finally:
            self._unlock()

    def remove_write_observer(self, WriteObserver observer):
        self._wrlock()
        try:
            self.observers = [o for o in self.observers if o is not observer]
        finally:
            self._unlock()

    cdef int _notify(self, int64_t offset, int64_t n) except -1:
        cdef WriteObserver o
        for o in self.observers:
            o.changed(offset, n)
        return 0

    def _notify_write(self, int64_t offset, int64_t n):
        """The write-observer hook for the Python paths (zeroes, discard,
        compressed writes)."""
        if self.observers:
            self._notify(offset, n)

    def _wrlock(self):
        with nogil:
            qf_rw_wrlock(self.rwlock)

    cdef inline void _rdlock_fast(self):
        """The shared lock, keeping the GIL when it is free (the usual case:
        only metadata updates take it exclusively)."""
        if qf_rw_tryrdlock(self.rwlock) != 0:
            with nogil:
                qf_rw_rdlock(self.rwlock)

    def _unlock(self):
        qf_rw_unlock(self.rwlock)

    def _trywrlock(self):
        """Take the exclusive lock if it is free at once (True), else False."""
        return qf_rw_trywrlock(self.rwlock) == 0

    def _set_chain(self, ChainStep chain, int chain_first):
        """Read what lies below from layer ``chain_first`` of ``chain`` on
        (a layer joining its chain, engine/chain.py)."""
        self.chain_step = chain
        self.chain_first = chain_first

    def _set_resume(self, resume_file):
        """``resume_file()``: reopens this image's file after a deep chain
        suspended it (engine/chain.py)."""
        self.resume_file = resume_file

    def _resume(self):
        if self.resume_file is None:
            raise ImageClosedError(f"{self.s.path}: the image file is not open")
        self.resume_file()

    # -- the loops -------------------------------------------------------------

    cdef inline int _slice_at(self, int64_t pos, bint exclusive, uint64_t **l2,
                              int64_t *l2i, int *slot_out, uint64_t *l1e_out) except -2:
        """Find the cached L2 slice mapping guest ``pos`` (l2slice.pxd):
        SLICE_OK, L1_UNALLOCATED, MISS (shared holder: retry exclusively;
        an exclusive holder loads the slice) or BAD."""
        cdef int64_t key
        cdef int st = slice_lookup(self.s, pos, l2, l2i, slot_out, l1e_out, &key)
        if st != MISS or not exclusive:
            return st
        return self._slice_load(pos, key, l2, l2i, slot_out)

    cdef int _slice_load(self, int64_t pos, int64_t key, uint64_t **l2, int64_t *l2i,
                         int *slot_out) except -2:
        """_slice_at's miss under the exclusive lock: load the slice."""
        slot_out[0] = self.s.l2_cache.c_load(key, True)
        slice_point(self.s, slot_out[0], pos, l2, l2i)
        return SLICE_OK

    cdef int64_t _layer_run(self, int64_t pos, int64_t n, int *kind, uint64_t *host) except -2:
        """This layer's own answer for the first run of guest [pos, pos+n),
        for the chain (chain.pyx): returns the run's length in bytes and
        sets ``kind`` -- EXT_DATA (``host``: the host offset of ``pos``),
        EXT_ZERO, EXT_UNALLOCATED, or EXT_INVALID for what only the Python
        path reads (compressed or malformed entries, data past the host
        limit).  The caller holds the exclusive lock (slices may load)."""
        cdef ImageState s = self.s
        cdef int64_t l2i, count, run, chunk
        cdef int ub = s.unit_bits, st, slot
        cdef int64_t us = (<int64_t>1) << ub, in_u = pos & (us - 1)
        cdef int64_t slice_units = (<int64_t>1) << s.slice_unit_bits
        cdef uint64_t *l2
        cdef uint64_t l1e
        st = self._slice_at(pos, True, &l2, &l2i, &slot, &l1e)
        if st == L1_UNALLOCATED:
            kind[0] = EXT_UNALLOCATED
            chunk = (((pos >> (s.l2_bits + s.cluster_bits)) + 1)
                     << (s.l2_bits + s.cluster_bits)) - pos
        elif st != SLICE_OK:
            kind[0] = EXT_INVALID
            chunk = us - in_u
        else:
            count = (in_u + n + us - 1) >> ub
            if count > slice_units - l2i:
                count = slice_units - l2i
            run = l2_units_run(l2, l2i, count, s.cluster_bits, s.extended, False, kind, host,
                               s.external_data)
            chunk = (run << ub) - in_u
            if kind[0] == EXT_DATA:
                if host[0] + <uint64_t>(run << ub) > <uint64_t>s.host_limit:
                    kind[0] = EXT_INVALID
                host[0] += in_u
            elif kind[0] != EXT_ZERO and kind[0] != EXT_UNALLOCATED:
                kind[0] = EXT_INVALID
        return chunk if chunk < n else n

    cdef int64_t _read_loop(self, char *buf, int64_t off, int64_t n, bint exclusive) except -2:
        """Serve [off, off+n) as far as it can: data, zero, and unallocated
        (from the layers below, whatever they need).  Returns the bytes done,
        or NEED_EXCLUSIVE (nothing done) when a shared holder missed the
        cache."""
        cdef ImageState s = self.s
        cdef int64_t done = 0, pos, l2i, chunk, in_cl, count, run, rc, key
        cdef int ub = s.unit_bits
        cdef int64_t us = (<int64_t>1) << ub
        cdef int64_t slice_units = (<int64_t>1) << s.slice_unit_bits
        cdef uint64_t host
        cdef int kind, st, slot
        cdef uint64_t *l2
        cdef uint64_t l1e
        cdef File f = s.data_file
        while done < n:
            pos = off + done
            in_cl = pos & (us - 1)
            st = slice_lookup(s, pos, &l2, &l2i, &slot, &l1e, &key)
            if st == MISS:
                if not exclusive:
                    return NEED_EXCLUSIVE if done == 0 else done
                st = self._slice_load(pos, key, &l2, &l2i, &slot)
            if st == BAD:
                break
            if st == L1_UNALLOCATED:
                # The whole L2 range is unallocated: the layers below show through.
                chunk = (((pos >> (s.l2_bits + s.cluster_bits)) + 1)
                         << (s.l2_bits + s.cluster_bits)) - pos
                if chunk > n - done:
                    chunk = n - done
                self._fill_below(buf + done, pos, chunk)
                done += chunk
                continue
            count = (in_cl + (n - done) + us - 1) >> ub
            if count > slice_units - l2i:
                count = slice_units - l2i
            run = l2_units_run(l2, l2i, count, s.cluster_bits, s.extended, False,
                               &kind, &host, s.external_data)
            chunk = (run << ub) - in_cl
            if chunk > n - done:
                chunk = n - done
            if kind == EXT_DATA:
                if host + <uint64_t>(run << ub) > <uint64_t>s.host_limit:
                    break
                if not s.funnel:     # s.read_data's plain case, one call less (hot path)
                    f.read_at(buf + done, chunk, host + in_cl)
                else:
                    s.read_data(buf + done, chunk, host + in_cl, pos)
            elif kind == EXT_ZERO:
                memset(buf + done, 0, chunk)
            elif kind == EXT_UNALLOCATED:
                self._fill_below(buf + done, pos, chunk)
            else:
                break
            done += chunk
        return done

    cdef int64_t _write_loop(self, const char *buf, int64_t off, int64_t n, bint exclusive,
                             bint *allocated) except -2:
        """Overwrite in place where clusters are allocated with refcount 1
        (QCOW_OFLAG_COPIED) and hold no metadata; with the exclusive lock,
        also allocate where nothing has to be copied (see _alloc_write).
        Returns bytes done or NEED_EXCLUSIVE."""
        cdef ImageState s = self.s
        cdef int64_t done = 0, pos, l2i, chunk, in_cl, count, run, rc, k, key
        cdef int ub = s.unit_bits
        cdef int64_t us = (<int64_t>1) << ub
        cdef int64_t slice_units = (<int64_t>1) << s.slice_unit_bits
        cdef uint64_t host, l1e, desc
        cdef int kind, st, slot
        cdef uint64_t *l2
        cdef File f = s.data_file
        cdef bint has_backing = self.chain_step is not None
        while done < n:
            pos = off + done
            in_cl = pos & (us - 1)
            st = slice_lookup(s, pos, &l2, &l2i, &slot, &l1e, &key)
            if st == MISS:
                if not exclusive:
                    return NEED_EXCLUSIVE if done == 0 else done
                st = self._slice_load(pos, key, &l2, &l2i, &slot)
            if st != SLICE_OK:
                break
            count = (in_cl + (n - done) + us - 1) >> ub
            if count > slice_units - l2i:
                count = slice_units - l2i
            run = l2_units_run(l2, l2i, count, s.cluster_bits, s.extended, True,
                               &kind, &host, s.external_data)
            if kind == EXT_ZERO and host and not s.extended:
                run = 0         # preallocated zero clusters: the slow path reuses them
            desc = l2[2 * (l2i >> SC_BITS)] if s.extended else l2[l2i]
            if kind == EXT_DATA and (desc >> 63):
                if host + <uint64_t>(run << ub) > <uint64_t>s.host_limit:
                    break
                chunk = (run << ub) - in_cl
                if chunk > n - done:
                    chunk = n - done
                if s.touches_metadata(host + in_cl, chunk):
                    break           # the slow path reports the corruption
                if (f.direct and not f.aligned(buf + done, chunk, host + in_cl)) or (
                        s.transform is not None and not s.transform_aligned(chunk, host + in_cl)):
                    # Read-modify-write of a block must not race: exclusive only.
                    if not exclusive:
                        return NEED_EXCLUSIVE if done == 0 else done
                if not s.funnel:     # s.write_data's plain case, one call less (hot path)
                    f.write_at(buf + done, chunk, host + in_cl)
                else:
                    s.write_data(buf + done, chunk, host + in_cl, pos)
            elif s.alloc_fast and (l1e & QCOW_OFLAG_COPIED) and run > 0 and (
                    kind == EXT_UNALLOCATED or kind == EXT_ZERO or s.extended):
                if not exclusive:
                    return NEED_EXCLUSIVE if done == 0 else done
                if s.extended:
                    chunk = self._alloc_write_ext(buf + done, pos, n - done, l2, l2i, slot)
                else:
                    chunk = self._alloc_write(buf + done, pos, n - done, l2, l2i, run, slot,
                                              kind == EXT_UNALLOCATED and has_backing)
                if chunk < 0:
                    break           # the slow path does it (refcount block, copy, report)
                allocated[0] = True
            else:
                break
            done += chunk
        return done

    cdef int _fill_below(self, char *dst, int64_t pos, int64_t n) except -1:
        """``dst`` = what the layers below show at guest [pos, pos+n) (for
        ranges unallocated here; zeros without a backing file): the chain
        step, in C (chain.pyx), which hands to Python only the layer that
        needs it (a compressed cluster, say)."""
        if n <= 0:
            return 0
        if self.chain_step is None:
            memset(dst, 0, n)
            return 0
        return self.chain_step.read_below(dst, pos, n, self.chain_first)

    cdef int _pwrite3(self, const char *a, int64_t na, const char *b, int64_t nb,
                      const char *c, int64_t nc, uint64_t off, uint64_t guest) except -1:
        """Write the pieces a, b, c back to back at host ``off`` of the data
        file (guest offset ``guest``; any may be empty), through the data
        funnel."""
        cdef ImageState s = self.s
        if na:
            s.write_data(a, na, off, guest)
        if nb:
            s.write_data(b, nb, off + na, guest + na)
        if nc:
            s.write_data(c, nc, off + na + nb, guest + na + nb)
        return 0

    cdef int64_t _alloc_write(self, const char *buf, int64_t pos, int64_t remaining,
                              uint64_t *l2, int64_t l2i, int64_t run, int slot,
                              bint below) except -2:
        """Allocate host clusters for up to ``run`` guest clusters that are
        unallocated here or zero clusters without a host offset, and write
        guest data at ``pos`` into them.  The untouched parts of the first
        and last cluster get what the guest saw there: the backing chain's
        bytes (``below``) or zeros (which fresh space past the end of
        everything written already reads as).  Order: refcounts raised,
        data written, then the L2 entries (the cache writes refcount blocks
        before L2 slices).  Returns bytes written, or -1 when a refcount
        block must be created first (nothing done)."""
        cdef ImageState s = self.s
        cdef int64_t cs = s.cluster_size, in_cl = pos & (cs - 1)
        cdef int64_t chunk = (run << s.cluster_bits) - in_cl, nclusters, c, k, tail
        cdef uint64_t host, end
        cdef bint ordered = True, shows_below
        if chunk > remaining:
            chunk = remaining
        nclusters = (in_cl + chunk + cs - 1) >> s.cluster_bits
        if s.external_data:
            host = <uint64_t>(pos - in_cl)  # the guest offset in the data file, no refcount
        else:
            c = self.rc.c_alloc(nclusters)
            if c < 0:
                return -1
            host = (<uint64_t>c) << s.cluster_bits
        end = host + (nclusters << s.cluster_bits)
        if s.touches_metadata(host, end - host):
            self.overlap_found(host)        # marks the image corrupt, raises
        tail = (nclusters << s.cluster_bits) - in_cl - chunk
        shows_below = below
        if not in_cl and not tail:
            below = False               # whole clusters: nothing below shows through
        if below and nclusters == 1:
            # One cluster: one read of what is below, merged, one write.
            self._fill_below(self.scratch, pos - in_cl, cs)
            memcpy(self.scratch + in_cl, buf, chunk)
            self._pwrite3(self.scratch, cs, NULL, 0, NULL, 0, host, pos - in_cl)
        elif below:
            self._fill_below(self.scratch, pos - in_cl, in_cl)
            self._fill_below(self.scratch + cs, pos + chunk, tail)
            self._pwrite3(self.scratch, in_cl, buf, chunk, self.scratch + cs, tail, host,
                          pos - in_cl)
        elif <int64_t>host < s.zero_from:           # reused space: zero the edges
            self._pwrite3(self.zeros, in_cl, buf, chunk, self.zeros, tail, host, pos - in_cl)
        else:                                       # fresh space: the edges read as zeros
            if not shows_below and s.lazy_refcounts and not s.unsafe and not s.external_data:
                # The guest saw zeros here, and space below durable_end reads
                # as zeros after a power loss (its size is stable): the new
                # entries need no data barrier (a lost write leaves what was
                # there).  Past durable_end they wait for the next data
                # barrier, which grows the file a step ahead (flush.py): no
                # barrier on the write path.  Refcounts are not ordered
                # under lazy refcounts either.
                ordered = <int64_t>end > s.durable_end
            self._pwrite3(NULL, 0, buf, chunk, NULL, 0, host + in_cl, pos)
        for k in range(nclusters):
            l2[l2i + k] = (host + (k << s.cluster_bits)) | QCOW_OFLAG_COPIED
        self._allocated(slot, l2i, nclusters, end, ordered)
        return chunk

    cdef int64_t _alloc_write_ext(self, const char *buf, int64_t pos, int64_t remaining,
                                  uint64_t *l2, int64_t u, int slot) except -2:
        """The allocating write of subcluster.py in C for one cluster whose
        entry is unallocated or a host cluster of its own (COPIED): the
        touched subclusters become allocated; a partial one at either edge
        not yet allocated gets what the guest saw there (backing chain or
        zeros).  Returns bytes written (up to the cluster's end), or -1 for
        the slow path (compressed, shared, malformed, overlap, a refcount
        block to create)."""
        cdef ImageState s = self.s
        cdef int64_t cs = s.cluster_size, a = pos & (cs - 1), b, lo, hi, c
        cdef int scb = s.unit_bits, s0, s1
        cdef int64_t w = 2 * (u >> SC_BITS)
        cdef uint64_t desc = l2[w], bm = l2[w + 1], host, target, touched
        cdef uint64_t alloc = bm & SC_ALLOC_MASK, zero = bm >> SC_ZERO_SHIFT
        cdef bint head, tail
        host = desc & L2E_OFFSET_MASK
        if (desc & QCOW_OFLAG_COMPRESSED) or (desc & L2E_STD_RESERVED_MASK) \
                or (host and not (desc & QCOW_OFLAG_COPIED)) or (host & (cs - 1)) \
                or (zero & alloc) or (not host and alloc):
            return -1
        b = a + remaining if a + remaining < cs else cs
        s0 = <int>(a >> scb)
        s1 = <int>((b - 1) >> scb)
        lo = (<int64_t>s0) << scb
        hi = (<int64_t>(s1 + 1)) << scb
        touched = ((((<uint64_t>1) << (s1 - s0)) << 1) - 1) << s0
        head = a > lo and not (host and (alloc >> s0) & 1)
        tail = b < hi and not (host and (alloc >> s1) & 1)
        if host:
            target = host
            if s.touches_metadata(target + lo, hi - lo):
                return -1                           # the slow path reports it
        elif s.external_data:
            if desc & QCOW_OFLAG_COPIED:
                return -1       # host offset 0 of the data file (at_host0): the slow path
            target = <uint64_t>(pos - a)    # the guest offset in the data file, no refcount
        else:
            c = self.rc.c_alloc(1)
            if c < 0:
                return -1
            target = (<uint64_t>c) << s.cluster_bits
            if s.touches_metadata(target, cs):
                self.overlap_found(target)
        pos -= a                                    # the guest cluster's start
        if head and tail and s0 == s1 and not ((zero >> s0) & 1):
            # Inside one subcluster: one read of what is below, merged, one write.
            self._fill_below(self.scratch, pos + lo, hi - lo)
            memcpy(self.scratch + (a - lo), buf, b - a)
            self._pwrite3(self.scratch, hi - lo, NULL, 0, NULL, 0, target + lo, pos + lo)
        else:
            if head:
                if (zero >> s0) & 1:
                    memset(self.scratch, 0, a - lo)
                else:
                    self._fill_below(self.scratch, pos + lo, a - lo)
            if tail:
                if (zero >> s1) & 1:
                    memset(self.scratch + cs, 0, hi - b)
                else:
                    self._fill_below(self.scratch + cs, pos + b, hi - b)
            self._pwrite3(self.scratch, (a - lo) if head else 0, buf, b - a, self.scratch + cs,
                          (hi - b) if tail else 0, target + (lo if head else a),
                          pos + (lo if head else a))
        l2[w] = target | QCOW_OFLAG_COPIED
        l2[w + 1] = ((zero & ~touched) << SC_ZERO_SHIFT) | alloc | touched
        self._allocated(slot, w, 2, target + cs)
        return b - a

    cdef void _allocated(self, int slot, int64_t word, int64_t nwords, uint64_t end,
                         bint ordered=True):
        """Book-keeping after data went into clusters ending at ``end`` and
        the slice's L2 words [word, word+nwords) were set (``ordered``: they
        need the data barrier before they are written)."""
        cdef ImageState s = self.s
        s.l2_cache.c_mark_dirty_range(slot, 8 * word, 8 * (word + nwords), ordered)
        if <int64_t>end > s.zero_from:
            s.zero_from = end
        if s.external_data:     # (alloc_end and host_limit are the image file's)
            return
        if <int64_t>end > s.alloc_end:
            s.alloc_end = end
        if <int64_t>end > s.host_limit:
            s.host_limit = end

    # -- public API --------------------------------------------------------------

    cdef _check_range(self, int64_t offset, int64_t length):
        if self.s is None or self.s.closed:
            raise ImageClosedError("I/O operation on a closed image")
        if offset < 0 or length < 0 or offset + length > self.s.size:
            raise InvalidArgumentError(
                f"request [{offset}, {offset + length}) outside the image (size {self.s.size})")

    def _check_request(self, int64_t offset, int64_t length):
        """The range check of every request, for the Python entry points."""
        self._check_range(offset, length)

    def readinto(self, int64_t offset, buf):
        """Read ``len(buf)`` bytes at guest ``offset`` into ``buf``."""
        cdef Py_buffer view
        cdef int64_t done, n
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            n = view.len
            self._check_range(offset, n)
            done = self._locked_read(<char *>view.buf, offset, n)
        finally:
            PyBuffer_Release(&view)
        if done < n:
            self.read_fallback(offset + done, memoryview(buf).cast("B")[done:])
        return n

    def read(self, int64_t offset, int64_t length):
        """Return ``length`` bytes at guest ``offset``."""
        self._check_range(offset, length)
        out = PyBytes_FromStringAndSize(NULL, length)
        cdef int64_t done = self._locked_read(PyBytes_AS_STRING(out), offset, length)
        if done == length:
            return out
        rest = bytearray(length - done)
        self.read_fallback(offset + done, memoryview(rest))
        return out[:done] + rest

    def readv(self, requests):
        """Read several (offset, length) ranges in one call; returns a list of
        bytes.  Saves the per-call Python toll of many small reads."""
        cdef int64_t off, n, done
        cdef list out = []
        for off, n in requests:
            self._check_range(off, n)
            buf = PyBytes_FromStringAndSize(NULL, n)
            done = self._locked_read(PyBytes_AS_STRING(buf), off, n)
            if done < n:
                buf = self.read(off, n)
            out.append(buf)
        return out

    cdef int64_t _locked_read(self, char *buf, int64_t offset, int64_t n) except -2:
        cdef int64_t done
        self._rdlock_fast()
        while self.s.file.fd < 0:
            # A lower layer of a chain deeper than the descriptor limit
            # whose file was given back: reopen it (never with a lock held).
            qf_rw_unlock(self.rwlock)
            self._resume()
            self._rdlock_fast()
        try:
            done = self._read_loop(buf, offset, n, False)
        finally:
            qf_rw_unlock(self.rwlock)
        if done == NEED_EXCLUSIVE:
            with nogil:
                qf_rw_wrlock(self.rwlock)
            try:
                done = self._read_loop(buf, offset, n, True)
            finally:
                qf_rw_unlock(self.rwlock)
        return done

    def write(self, int64_t offset, data):
        """Write ``data`` (any bytes-like object) at guest ``offset``."""
        self._write(offset, data, self.s.writethrough if self.s is not None else False)
        return len(data) if isinstance(data, bytes) else memoryview(data).nbytes

    def writev(self, requests):
        """Write several (offset, data) pairs, in order, in one call; under
        writethrough they become stable together at the end."""
        cdef int64_t off
        for off, data in requests:
            self._write(off, data, False)
        if self.s.writethrough and requests:
            self.ordered_flush()

    cdef _write(self, int64_t offset, data, bint sync):
        cdef Py_buffer view
        cdef int64_t done, n
        cdef bint allocated = False
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            n = view.len
            self._check_range(offset, n)
            if self.s.read_only:
                raise ReadOnlyImageError(self.s.read_only_reason())
            if self.observers:
                self._notify(offset, n)
            self._rdlock_fast()
            try:
                done = self._write_loop(<const char *>view.buf, offset, n, False, &allocated)
            finally:
                qf_rw_unlock(self.rwlock)
            if done == NEED_EXCLUSIVE:
                with nogil:
                    qf_rw_wrlock(self.rwlock)
                try:
                    done = self._write_loop(<const char *>view.buf, offset, n, True, &allocated)
                finally:
                    qf_rw_unlock(self.rwlock)
        finally:
            PyBuffer_Release(&view)
        if done < n:
            self.write_fallback(offset + done, memoryview(data).cast("B")[done:])
            allocated = True
        if sync and n:
            if allocated:
                self.ordered_flush()    # metadata changed: the full ordered flush
            else:
                self.s.data_file.sync()

    def _fast_read_locked(self, int64_t offset, buf):
        """For the Python read path, which holds the exclusive lock: serve
        what the C loop can and return the number of bytes done."""
        cdef Py_buffer view
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            return self._read_loop(<char *>view.buf, offset, view.len, True)
        finally:
            PyBuffer_Release(&view)
