# cython: language_level=3
"""The request loop of ``qcow2fast bench`` in C.  Each request is one call
of the image's public method -- ``write(offset, data)`` or
``readinto(offset, buf)``, the calls a Python user makes -- timed with
CLOCK_MONOTONIC (perf_counter_ns's clock); only the loop's own bookkeeping
leaves the interpreter, so it no longer holds the GIL between requests."""

from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint8_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef enum:
    CHECK_EVERY = 64        # requests between looks at errors and signals (power of 2)


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


def timed_requests(readinto, write, const int64_t[:] offsets, const uint8_t[:] writes,
                   buf, data, int64_t[:] lat, list errors):
    """Request k is ``write(offsets[k], data)`` if ``writes[k]``, else
    ``readinto(offsets[k], buf)``; its latency in ns goes to ``lat[k]``.
    Returns the number of requests done: fewer than asked once ``errors``
    is non-empty (another worker failed).  Exceptions propagate."""
    cdef Py_ssize_t k, n = offsets.shape[0]
    cdef int64_t t0
    if writes.shape[0] != n or lat.shape[0] != n:
        raise ValueError("timed_requests: offsets, writes and lat differ in length")
    for k in range(n):
        if k & (CHECK_EVERY - 1) == 0:
            if errors:
                return k
            PyErr_CheckSignals()
        off = offsets[k]
        t0 = now_ns()
        if writes[k]:
            write(off, data)
        else:
            readinto(off, buf)
        lat[k] = now_ns() - t0
    return n
