# cython: language_level=3
"""An NBD connection's socket work in C (nbd/channel.py owns the buffers).

``recv_polled``: receive with adaptive polling (qemu's poll-max-ns): try
without sleeping for up to POLL_NS before sleeping in the kernel, since a
synchronous client's next request usually comes within it and a sleep and
wake-up cost more.  A poll that fails is pure loss (with the client on the
same CPU it cannot even send while we spin), so after one the next
``Polling.rest`` waits sleep at once, twice as many after each failure
(POLL_REST_MIN up to POLL_REST_MAX), back to the minimum on a success.

``BitmapStatusLoop``: NBD_CMD_BLOCK_STATUS with one dirty bitmap the only
context selected -- a backup tool's request, hundreds per ``nbdinfo
--map`` -- answered from receive buffer to send buffer without the
interpreter: per request one Python call (the bitmap's lookup) and the
packing of its runs in C.  Anything else ends the loop with that request
still buffered, for the Python request loop.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from .common cimport QF_BSWAP16, QF_BSWAP32, QF_BSWAP64
from .hooks cimport DirtyBitmap

from os import strerror

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL

cdef enum:
    _POLL_NS = 50_000
    _POLL_REST_MIN = 8
    _POLL_REST_MAX = 4096

POLL_NS, POLL_REST_MIN, POLL_REST_MAX = _POLL_NS, _POLL_REST_MIN, _POLL_REST_MAX

# What BitmapStatusLoop.run returns: the next request is Python's, or the
# client closed the connection.
PYTHON = 0
CLOSED = 1

cdef enum:
    REQUEST_SIZE = 28       # magic, flags, type, cookie, offset, length (proto.md)
    REPLY_HEAD = 24         # structured reply chunk header + context id


cdef class Polling:
    """One connection's polling state (see the module's docstring)."""
    cdef public int rest, backoff

    def __init__(self, int rest=0, int backoff=_POLL_REST_MIN):
        self.rest, self.backoff = rest, backoff


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef ssize_t _recv_polled(int fd, char *buf, size_t n, int *rest, int *backoff) noexcept nogil:
    """recv into buf, polling first unless resting; -errno on an error."""
    cdef ssize_t got
    cdef int64_t end = 0, now
    if rest[0] == 0:
        while True:
            got = recv(fd, buf, n, MSG_DONTWAIT)
            if got >= 0:
                backoff[0] = _POLL_REST_MIN
                return got
            if errno != EAGAIN and errno != EINTR:          # (EWOULDBLOCK is EAGAIN on Linux)
                return -errno
            now = _now_ns()
            if end == 0:
                end = now + _POLL_NS
            elif now >= end:
                break
        rest[0] = backoff[0]
        backoff[0] = min(2 * backoff[0], _POLL_REST_MAX)
    else:
        rest[0] -= 1
    while True:
        got = recv(fd, buf, n, 0)
        if got >= 0:
            return got
        if errno != EINTR:
            return -errno


cdef ssize_t _send_all(int fd, const char *buf, size_t n) noexcept nogil:
    """0, or -errno."""
    cdef ssize_t sent
    cdef size_t done = 0
    while done < n:
        sent = send(fd, buf + done, n - done, MSG_NOSIGNAL)
        if sent < 0:
            if errno == EINTR:
                continue
            return -errno
        done += sent
    return 0


def _raise(ssize_t err):
    raise OSError(-err, strerror(-err))


def recv_polled(int fd, unsigned char[::1] buf, Polling polling):
    """Receive into ``buf`` from blocking socket ``fd`` (at least one byte,
    or 0 at end of stream), polling as the module's docstring says."""
    cdef ssize_t got
    if buf.shape[0] == 0:
        return 0
    with nogil:
        got = _recv_polled(fd, <char *>&buf[0], buf.shape[0], &polling.rest, &polling.backoff)
    if got < 0:
        _raise(got)
    return got


cdef class BitmapStatusLoop:
    """BLOCK_STATUS of one export's lone dirty bitmap context, in C.

    ``protocol`` is nbd.protocol (its constants are declared there);
    ``lookup(name)`` gives the bitmap's DirtyBitmap per request (it may be
    removed meanwhile: then the lookup raises and the request is left to
    Python, which answers the error); ``flags`` the command flags the
    request may carry; replies of more than ``room`` descriptors are left
    to Python too (it counts them first)."""
    cdef uint32_t request_magic, reply_magic
    cdef uint16_t command, flags, req_one, done, reply_type
    cdef uint32_t cid
    cdef uint64_t size
    cdef Py_ssize_t room, most
    cdef object lookup, name

    def __init__(self, protocol, lookup, name, uint32_t cid, uint64_t size, uint16_t flags,
                 Py_ssize_t room, Py_ssize_t most):
        self.request_magic = protocol.NBD_REQUEST_MAGIC
        self.command = protocol.NBD_CMD_BLOCK_STATUS
        self.req_one = protocol.NBD_CMD_FLAG_REQ_ONE
        self.reply_magic = protocol.NBD_STRUCTURED_REPLY_MAGIC
        self.done = protocol.NBD_REPLY_FLAG_DONE
        self.reply_type = protocol.NBD_REPLY_TYPE_BLOCK_STATUS
        if protocol.BLOCK_STATUS_REPLY.size != REPLY_HEAD or protocol.REQUEST.size != REQUEST_SIZE:
            raise ValueError("nbd.protocol's layouts are not the ones BitmapStatusLoop packs")
        self.lookup, self.name, self.cid, self.size = lookup, name, cid, size
        self.flags, self.room, self.most = flags, room, most

    def run(self, int fd, bytearray rbuf, Py_ssize_t rpos, Py_ssize_t rend, bytearray obuf,
            Py_ssize_t olen, Polling polling):
        """Answer the requests buffered in ``rbuf[rpos:rend]`` and those
        received after them on blocking socket ``fd`` (replies queued in
        ``obuf[:olen]``, sent before each wait for input), until the next
        request is not this loop's.  Returns (PYTHON or CLOSED, rpos, rend,
        olen, errno): the buffers' new state, and the error that stopped
        it (0 if none) for the caller to raise once it has the state."""
        cdef char *r = PyByteArray_AS_STRING(rbuf)
        cdef char *o = PyByteArray_AS_STRING(obuf)
        cdef Py_ssize_t rcap = PyByteArray_GET_SIZE(rbuf), ocap = PyByteArray_GET_SIZE(obuf)
        cdef Py_ssize_t n, most
        cdef ssize_t got
        cdef uint32_t magic, length
        cdef uint16_t flags, command
        cdef uint64_t offset
        cdef char *p
        cdef uint32_t *w
        cdef DirtyBitmap bitmap
        if ocap < REPLY_HEAD + 8 * self.room or rcap < REQUEST_SIZE:
            return PYTHON, rpos, rend, olen, 0
        while True:
            if rend - rpos < REQUEST_SIZE:
                if rpos:                        # keep the unread tail at the front
                    memmove(r, r + rpos, rend - rpos)
                    rend -= rpos
                    rpos = 0
                if olen:                        # replies go before we wait
                    with nogil:
                        got = _send_all(fd, o, olen)
                    olen = 0
                    if got < 0:
                        return PYTHON, rpos, rend, olen, -got
                with nogil:
                    got = _recv_polled(fd, r + rend, rcap - rend, &polling.rest,
                                       &polling.backoff)
                if got == 0:
                    return CLOSED, rpos, rend, olen, 0
                if got < 0:
                    return PYTHON, rpos, rend, olen, -got
                rend += got
                continue
            p = r + rpos
            memcpy(&magic, p, 4)
            memcpy(&flags, p + 4, 2)
            memcpy(&command, p + 6, 2)
            memcpy(&offset, p + 16, 8)
            memcpy(&length, p + 24, 4)
            offset, length = QF_BSWAP64(offset), QF_BSWAP32(length)
            flags = QF_BSWAP16(flags)
            if (QF_BSWAP32(magic) != self.request_magic or QF_BSWAP16(command) != self.command
                    or flags & ~self.flags or length == 0 or offset > self.size
                    or length > self.size - offset):
                return PYTHON, rpos, rend, olen, 0
            try:
                bitmap = self.lookup(self.name)
            except Exception:
                return PYTHON, rpos, rend, olen, 0
            if olen + REPLY_HEAD + 8 * self.room > ocap:
                with nogil:
                    got = _send_all(fd, o, olen)
                olen = 0
                if got < 0:
                    return PYTHON, rpos, rend, olen, -got
            most = 1 if flags & self.req_one else self.most
            if most > self.room:
                most = self.room
            w = <uint32_t *>(o + olen + REPLY_HEAD)
            n = bitmap.descriptors(<int64_t>offset, length, w, most)
            if n == self.room and n < (1 if flags & self.req_one else self.most):
                return PYTHON, rpos, rend, olen, 0      # maybe more: Python counts them
            w = <uint32_t *>(o + olen)
            w[0] = QF_BSWAP32(self.reply_magic)
            w[1] = QF_BSWAP32((<uint32_t>self.done << 16) | self.reply_type)
            memcpy(o + olen + 8, p + 8, 8)              # the request's cookie, as sent
            w[4] = QF_BSWAP32(<uint32_t>(4 + 8 * n))
            w[5] = QF_BSWAP32(self.cid)
            olen += REPLY_HEAD + 8 * n
            rpos += REQUEST_SIZE
