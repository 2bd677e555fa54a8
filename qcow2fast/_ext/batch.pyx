# cython: language_level=3
"""Batches of guest requests resolved and transferred in C: the data path
of ``Image.submit``, ``Image.readv_into``, ``qcow2fast bench -d N``, the
asyncio interface and the NBD server's pipelined requests.

A batch is a sequence of reads and writes.  It is cut into segments; each
segment is resolved from the cached L2 slices under the image's shared
lock and its host transfers go to the kernel together (one io_uring_enter,
or a loop of pread/pwrite: csrc/qf_uring.h says which, when and why),
all with the GIL released; reads below the image go to the layers of its
backing chain in the same batch, through the chain's resolved map
(chain.pyx's batch_reads).  A request C does not serve -- an allocating or
copy-on-write write, a compressed or malformed cluster, an L2 slice not in
the cache, a read below that the resolved map cannot answer yet, an
encrypted image or layer, an unaligned O_DIRECT transfer -- goes through
the image's one-request path (``readinto``/``write``), alone, in its place.

Ordering: the requests of one batch complete as if issued one after the
other, in order.  A segment never holds two requests that overlap where one
of them changes what the other sees -- in the guest (a write and any other
request on the same bytes) or in memory (a read into a buffer another
request reads from or writes into); such a request starts a new segment,
after the transfers before it have completed.  Each request succeeds or
fails on its own: the result is its length, or the exception it met.
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.stdint cimport int64_t, uint64_t, uint8_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset, strerror
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from .chain cimport ChainCore
from .core cimport ImageCore
from .segment cimport (OP_READ, OP_WRITE, PENDING, SLOW, FAILED, Req, _segments)
from .state cimport ImageState
from .uring cimport QF_RING_ENTRIES, qf_xfer

from ..errors import ReadOnlyImageError

# The engine batches use (csrc/qf_uring.h).
cdef extern from "qf_uring.h" nogil:
    int QF_ENGINE_PREAD
    int QF_ENGINE_URING
    int QF_ENGINE_AUTO
    int qf_uring_wanted
    int qf_uring_split
    void *qf_thread_ring()

READ = OP_READ
WRITE = OP_WRITE
_OPS = {READ: READ, WRITE: WRITE, "read": READ, "write": WRITE, "r": READ, "w": WRITE}

_ENGINES = {"pread": QF_ENGINE_PREAD, "io_uring": QF_ENGINE_URING, "auto": QF_ENGINE_AUTO}


def io_engine():
    """The engine chosen for batches: "auto" (io_uring for O_DIRECT files,
    the pread/pwrite loop for the page cache: csrc/qf_uring.h says why),
    "io_uring", or "pread"; "io_uring" becomes "pread" where this thread
    cannot set up a ring."""
    if qf_uring_wanted == QF_ENGINE_PREAD:
        return "pread"
    if qf_thread_ring() == NULL:
        return "pread"
    return "auto" if qf_uring_wanted == QF_ENGINE_AUTO else "io_uring"


def set_async_split(int split):
    """Batches of 4 or more transfers hand those from ``n / split`` on to
    the kernel's workers (IOSQE_ASYNC), which run them on another CPU while
    this thread does the rest; 0 keeps all in this thread.  Returns the
    previous value."""
    global qf_uring_split
    old = qf_uring_split
    qf_uring_split = max(split, 0)
    return old


def set_io_engine(str name):
    """Choose the engine of every batch from now on: "auto" (the default),
    "io_uring" (when the kernel allows it, else the loop) or "pread" (a loop
    of pread/pwrite).  Returns the previous choice."""
    global qf_uring_wanted
    if name not in _ENGINES:
        raise ValueError(f"unknown I/O engine {name!r} (auto, io_uring or pread)")
    old = [k for k, v in _ENGINES.items() if v == qf_uring_wanted][0]
    qf_uring_wanted = _ENGINES[name]
    return old


cdef class _Batch:
    """The C arrays of one batch, and the Python objects behind them."""
    cdef Req *r
    cdef Py_buffer *views
    cdef qf_xfer *x
    cdef int n
    cdef list objs                  # request i's buffer object
    cdef list results               # an exception, or None

    def __cinit__(self, int n):
        self.n = n
        self.r = <Req *>calloc(max(n, 1), sizeof(Req))
        self.views = <Py_buffer *>calloc(max(n, 1), sizeof(Py_buffer))
        self.x = <qf_xfer *>calloc(QF_RING_ENTRIES, sizeof(qf_xfer))
        if self.r == NULL or self.views == NULL or self.x == NULL:
            raise MemoryError()
        self.objs = [None] * n
        self.results = [None] * n

    cdef void reset(self, int n):
        """Reuse for a batch of ``n`` (at most the first's) requests."""
        cdef int i
        memset(self.r, 0, n * sizeof(Req))
        for i in range(n):
            self.results[i] = None
        self.n = n

    def __dealloc__(self):
        self.release()
        free(self.r)
        free(self.views)
        free(self.x)

    cdef release(self):
        cdef int i
        for i in range(self.n):
            if self.r[i].held:
                PyBuffer_Release(&self.views[i])
                self.r[i].held = False

    cdef int add(self, ImageCore img, int i, int op, int64_t off, obj) except -1:
        """Request i: ``op`` at guest ``off`` with buffer ``obj``; a bad
        request gets its error now."""
        cdef Req *q = &self.r[i]
        q.op = op
        q.off = off
        q.res = FAILED
        self.objs[i] = obj
        try:
            PyObject_GetBuffer(obj, &self.views[i], PyBUF_SIMPLE if op == OP_WRITE else
                               PyBUF_SIMPLE | PyBUF_WRITABLE)
            q.held = True
            q.buf = <char *>self.views[i].buf
            q.len = self.views[i].len
            img._check_range(off, q.len)
            if op == OP_WRITE and img.s.read_only:
                raise ReadOnlyImageError(img.s.read_only_reason())
        except Exception as e:
            self.results[i] = e
            return 0
        q.res = PENDING
        return 0

    cdef int run(self, ImageCore img) except -1:
        """Carry out every request (see the module doc); the outcome is in
        ``r[i].res`` and ``results``."""
        cdef int n = self.n, i
        cdef bint below = img.chain_step is not None, wrote = False, slow_write
        cdef ChainCore chain = _chain_of(img)
        cdef ImageState s = img.s
        if img.observers:               # before any data moves (a crash over-reports)
            for i in range(n):
                if self.r[i].res == PENDING and self.r[i].op == OP_WRITE:
                    img._notify(self.r[i].off, self.r[i].len)
        if s.funnel:        # encrypted or blkdebug: the data funnel, request by request
            for i in range(n):
                if self.r[i].res == PENDING:
                    self.r[i].res = SLOW
        objs, results = self.objs, self.results
        with nogil:
            slow_write = _carry_out(img, s, self.r, n, self.x, below, chain, objs, None,
                                    results)
        for i in range(n):
            if self.r[i].op == OP_WRITE and self.r[i].len:
                # (after the writes, tried ones too: fileio.pxd's unsynced)
                s.data_file.unsynced = True
                if self.r[i].res >= 0:
                    wrote = True
        if wrote and s.writethrough:
            # The batch's writes return together: stable together.
            try:
                if slow_write:
                    img.ordered_flush()
                else:
                    s.data_file.sync()
            except Exception as e:
                for i in range(n):
                    if self.r[i].op == OP_WRITE and self.r[i].res >= 0:
                        self.results[i] = e
                        self.r[i].res = FAILED
        self.release()
        return 0

    cdef object outcome(self, int i):
        return _outcome(&self.r[i], self.results[i])


cdef object _outcome(Req *q, exc):
    """Request ``q``'s result: its length, or the exception it met
    (``exc`` when it failed in Python)."""
    cdef int err
    if q.res >= 0:
        return q.res
    if q.res == FAILED:
        return exc
    err = <int>-q.res
    return OSError(err, f"{'write' if q.op == OP_WRITE else 'read'} of {q.len} bytes at guest "
                        f"offset {q.off:#x}: {strerror(err).decode()}")


cdef ChainCore _chain_of(ImageCore img):
    """The chain below ``img`` when its batches read through it in C: the
    top's own chain, read from layer 0 through the resolved map; else None
    (reads below go through the one-request path)."""
    if (isinstance(img.chain_step, ChainCore) and img.chain_first == 0
            and (<ChainCore>img.chain_step).rmap is not None):
        return <ChainCore>img.chain_step
    return None


cdef bint _carry_out(ImageCore img, ImageState s, Req *r, int n, qf_xfer *x, bint below,
                     ChainCore chain,
                     list objs, wobj, list results) noexcept nogil:
    """Carry out requests r[:n] in order: segments in C (the GIL released
    while they run), each request marked SLOW through the image's
    one-request path, alone, in its place (with the GIL).  Request k's
    buffer object is ``wobj`` for a write when given, else ``objs[k]``;
    an exception lands in ``results[k]``.  Returns whether a write took the
    one-request path.  Called without the GIL."""
    cdef int k = 0
    cdef bint slow_write = False
    while k < n:
        if r[k].res != SLOW:
            k = _segments(img, s, r, n, k, x, below, chain)
            if k >= n:
                break
        with gil:
            slow_write |= _one_request(img, &r[k], objs[k] if wobj is None or r[k].op == OP_READ
                                       else wobj, results, k)
        k += 1
    return slow_write


cdef uint64_t _one_requests = 0      # requests left to the one-request path (with the GIL)


def one_requests():
    """How many batched requests so far the C path left to the image's
    one-request path (see the module doc): a statistic, and for tests."""
    return _one_requests


cdef bint _one_request(ImageCore img, Req *q, obj, list results, int k):
    """Request ``q`` through readinto/_write; returns whether it wrote."""
    global _one_requests
    _one_requests += 1
    try:
        if q.op == OP_READ:
            img.readinto(q.off, obj)
        else:
            img._write(q.off, obj, False)
        q.res = q.len
    except Exception as e:
        results[k] = e
        q.res = FAILED
    return q.op == OP_WRITE


def submit(ImageCore img, requests):
    """Carry out ``requests``, a sequence of ``(op, offset, buffer)``: op
    READ ("read") fills ``buffer`` (writable, its length is the request's)
    from guest ``offset``, WRITE ("write") writes it there.  They complete
    as if issued one after the other (see the module doc).  Returns one
    result per request: its length in bytes, or the exception it met
    (nothing is raised for a request's failure)."""
    reqs = requests if isinstance(requests, (list, tuple)) else list(requests)
    cdef int n = len(reqs), i
    cdef _Batch b = _Batch(n)
    if img.s is None or img.s.closed:
        img._check_range(0, 0)      # raises ImageClosedError
    for i in range(n):
        op, off, buf = reqs[i]
        code = _OPS.get(op)
        if code is None:
            raise ValueError(f"request {i}: unknown operation {op!r} (READ or WRITE)")
        b.add(img, i, code, off, buf)
    b.run(img)
    return [b.outcome(i) for i in range(n)]


def readv_into(ImageCore img, offsets, buffers):
    """Fill each of ``buffers`` from the guest offset at the same place in
    ``offsets``, as one batch; raises the first request's error, else
    returns the number of bytes read."""
    cdef int n = len(offsets), i
    cdef int64_t total = 0
    if len(buffers) != n:
        raise ValueError(f"readv_into: {n} offsets but {len(buffers)} buffers")
    cdef _Batch b = _Batch(n)
    if img.s is None or img.s.closed:
        img._check_range(0, 0)
    for i in range(n):
        b.add(img, i, OP_READ, offsets[i], buffers[i])
    b.run(img)
    for i in range(n):
        r = b.outcome(i)
        if isinstance(r, BaseException):
            raise r
        total += r
    return total


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


def timed_batches(ImageCore img, const int64_t[:] offsets, const uint8_t[:] writes,
                  list bufs, data, int depth, int64_t[:] lat, uint8_t[::1] stop=None):
    """``qcow2fast bench -d depth``'s loop: the requests in batches of
    ``depth`` (request k writes ``data`` at ``offsets[k]`` if ``writes[k]``,
    else reads into ``bufs[k % depth]``, all of one size); each request's
    latency in ns (its batch's time) goes to ``lat[k]``.  Raises the first
    error, after setting ``stop[0]``; returns the number of requests done,
    fewer than all when ``stop[0]`` was found set before a batch (another
    worker sharing ``stop`` failed).

    The buffers are taken once and the whole loop runs with the GIL
    released (taken again only for a request the one-request path
    serves), so several threads running it share nothing but the image:
    what a C program driving the batch engine gets.  Where the batch
    would have work in Python for every request -- write observers (dirty
    bitmaps), a data transform (encryption), writethrough -- it goes
    through ``Image.submit``'s path batch by batch instead."""
    cdef Py_ssize_t n = offsets.shape[0], a, k, i, m
    cdef int64_t t0, t, size
    cdef ImageState s
    cdef bint below, any_write = False, fast
    cdef ChainCore chain
    cdef Py_buffer wview
    cdef Py_buffer *views
    cdef _Batch b = _Batch(depth)
    cdef Req *q
    cdef uint8_t no_stop = 0
    cdef uint8_t *stopped = &no_stop if stop is None or stop.shape[0] == 0 else &stop[0]
    if writes.shape[0] != n or lat.shape[0] != n or len(bufs) < depth or depth < 1:
        raise ValueError("timed_batches: offsets, writes, lat or bufs do not match")
    if n == 0:
        return 0
    img._check_range(0, 0)
    s = img.s
    size = len(data)
    for k in range(depth):
        if len(bufs[k]) != size:
            raise ValueError("timed_batches: the buffers and data differ in size")
    for k in range(n):
        any_write |= writes[k] != 0
    fast = not img.observers and not s.funnel and not (any_write and s.writethrough)
    if fast:
        for k in range(n):          # (a request out of range: the checked path reports it)
            if offsets[k] < 0 or offsets[k] + size > s.size:
                fast = False
                break
    if fast and any_write and s.read_only:
        fast = False
    if not fast:
        return _timed_submits(img, offsets, writes, bufs, data, depth, lat, b, stopped)
    below = img.chain_step is not None
    chain = _chain_of(img)
    views = <Py_buffer *>calloc(depth, sizeof(Py_buffer))
    if views == NULL:
        raise MemoryError()
    if any_write:                   # (before the writes: fileio.pxd's unsynced)
        s.data_file.unsynced = True
    m = 0                           # buffers of bufs held
    try:
        PyObject_GetBuffer(data, &wview, PyBUF_SIMPLE)
        try:
            while m < depth:
                PyObject_GetBuffer(bufs[m], &views[m], PyBUF_SIMPLE | PyBUF_WRITABLE)
                m += 1
            a = 0
            with nogil:
                while a < n and not stopped[0]:
                    b.n = <int>(min(a + depth, n) - a)
                    for i in range(b.n):
                        q = &b.r[i]
                        q.op = OP_WRITE if writes[a + i] else OP_READ
                        q.off = offsets[a + i]
                        q.len = size
                        q.buf = <char *>(wview.buf if q.op == OP_WRITE else views[i].buf)
                        q.res = PENDING
                    t0 = _now_ns()
                    _carry_out(img, s, b.r, b.n, b.x, below, chain, bufs, data, b.results)
                    t = _now_ns() - t0
                    for i in range(b.n):
                        lat[a + i] = t
                        if b.r[i].res < 0:
                            stopped[0] = 1
                            with gil:
                                raise _outcome(&b.r[i], b.results[i])
                    a += depth
        finally:
            for k in range(m):
                PyBuffer_Release(&views[k])
            PyBuffer_Release(&wview)
    finally:
        free(views)
    return min(a, n)


cdef Py_ssize_t _timed_submits(ImageCore img, const int64_t[:] offsets, const uint8_t[:] writes,
                               list bufs, data, int depth, int64_t[:] lat, _Batch b,
                               uint8_t *stopped) except -1:
    """timed_batches through the checked path: each batch's buffers taken
    and its requests checked with the GIL held, as ``Image.submit``."""
    cdef Py_ssize_t n = offsets.shape[0], a, k, e
    cdef int64_t t0, t
    for a in range(0, n, depth):
        if stopped[0]:
            return a
        e = min(a + depth, n)
        b.reset(e - a)
        for k in range(a, e):
            b.add(img, k - a, OP_WRITE if writes[k] else OP_READ, offsets[k],
                  data if writes[k] else bufs[k - a])
        t0 = _now_ns()
        b.run(img)
        t = _now_ns() - t0
        for k in range(a, e):
            lat[k] = t
            if b.r[k - a].res < 0:
                stopped[0] = 1
                raise b.outcome(k - a)
    return n
