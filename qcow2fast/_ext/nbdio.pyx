# cython: language_level=3
"""An NBD connection's socket work in C (nbd/channel.py owns the buffers).

``recv_polled``: receive with adaptive polling (qemu's poll-max-ns): try
without sleeping for up to POLL_NS before sleeping in the kernel, since a
synchronous client's next request usually comes within it and a sleep and
wake-up cost more.  A poll that fails is pure loss (with the client on the
same CPU it cannot even send while we spin), so after one the next
``Polling.rest`` waits sleep at once, twice as many after each failure
(POLL_REST_MIN up to POLL_REST_MAX), back to the minimum on a success.

``RequestLoop``: the requests a plain connection answers without the
interpreter, from receive buffer to send buffer -- small READs, one at a
time or pipelined, and BLOCK_STATUS with one dirty bitmap the only context
selected (a backup tool's request, hundreds per ``nbdinfo --map``: per
request one Python call, the bitmap's lookup).  Anything else ends the
loop with that request still buffered, for the Python request loop.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from .common cimport QF_BSWAP16, QF_BSWAP32, QF_BSWAP64
from .core cimport ImageCore
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

# What RequestLoop.run returns: the next request is Python's, the client
# closed the connection, or the next request (a READ) failed: Python
# answers it with ``take_failure()``'s exception, as if it had raised there.
PYTHON = 0
CLOSED = 1
FAILED = 2

cdef enum:
    REQUEST_SIZE = 28       # magic, flags, type, cookie, offset, length (proto.md)
    REPLY_HEAD = 24         # structured reply chunk header + context id
    DATA_HEAD = 28          # structured reply chunk header + offset (OFFSET_DATA)
    SIMPLE_HEAD = 16        # simple reply: magic, error, cookie


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


cdef int _raise(ssize_t err) except -1:
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


cdef class RequestLoop:
    """The requests of one NBD connection that are answered in C, from its
    receive buffer to its send buffer (Channel.serve_in_c):

    - a READ of less than ``serve_reads``' limit, read as
      ``ImageCore.readinto`` reads (its C path, the GIL released around
      each pread, so connections read in parallel; what C does not serve,
      a compressed cluster, through the image's read fallback); a read
      that fails is not redone (an injected error fires once): its
      exception is handed to Python, which answers it;
    - with ``serve_bitmap``, BLOCK_STATUS when one dirty bitmap is the only
      context selected, of at most ``room`` runs.

    Anything else -- another command, flags or a range the protocol
    refuses, an error -- is left buffered for the Python loop, which
    answers it as it answers everything.  ``protocol`` is nbd.protocol
    (its constants are declared there)."""
    cdef uint32_t request_magic, reply_magic, simple_magic
    cdef uint16_t cmd_read, cmd_status, flag_df, req_one, done, type_data, type_status
    cdef uint64_t size
    cdef bint structured
    # reads
    cdef ImageCore image
    cdef uint32_t read_below
    # the lone bitmap
    cdef object lookup, name
    cdef uint32_t cid
    cdef uint16_t status_flags
    cdef Py_ssize_t room, most
    cdef object failure                 # the exception of the READ that FAILED

    def __init__(self, protocol, uint64_t size, bint structured):
        self.request_magic = protocol.NBD_REQUEST_MAGIC
        self.reply_magic = protocol.NBD_STRUCTURED_REPLY_MAGIC
        self.simple_magic = protocol.NBD_SIMPLE_REPLY_MAGIC
        self.cmd_read = protocol.NBD_CMD_READ
        self.cmd_status = protocol.NBD_CMD_BLOCK_STATUS
        self.flag_df = protocol.NBD_CMD_FLAG_DF
        self.req_one = protocol.NBD_CMD_FLAG_REQ_ONE
        self.done = protocol.NBD_REPLY_FLAG_DONE
        self.type_data = protocol.NBD_REPLY_TYPE_OFFSET_DATA
        self.type_status = protocol.NBD_REPLY_TYPE_BLOCK_STATUS
        if (protocol.REQUEST.size != REQUEST_SIZE
                or protocol.BLOCK_STATUS_REPLY.size != REPLY_HEAD
                or protocol.OFFSET_DATA_REPLY.size != DATA_HEAD
                or protocol.SIMPLE_REPLY.size != SIMPLE_HEAD):
            raise ValueError("nbd.protocol's layouts are not the ones RequestLoop packs")
        self.size, self.structured = size, structured

    def serve_reads(self, ImageCore image, uint32_t below):
        """Answer READs shorter than ``below`` bytes from ``image``."""
        self.image, self.read_below = image, below

    def serve_bitmap(self, lookup, name, uint32_t cid, uint16_t flags, Py_ssize_t room,
                     Py_ssize_t most):
        """Answer BLOCK_STATUS with command ``flags`` allowed from the
        DirtyBitmap ``lookup(name)`` gives per request (it may be removed
        meanwhile: then the lookup raises and Python answers the error),
        as context ``cid``, in at most ``most`` descriptors; a reply that
        may need more than ``room`` is left to Python (it counts first)."""
        self.lookup, self.name, self.cid = lookup, name, cid
        self.status_flags, self.room, self.most = flags, room, most

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
        cdef Py_ssize_t need
        cdef ssize_t got
        cdef uint32_t magic, length
        cdef uint16_t flags, command
        cdef uint64_t offset
        cdef char *p
        if rcap < REQUEST_SIZE:
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
            magic, flags, command = QF_BSWAP32(magic), QF_BSWAP16(flags), QF_BSWAP16(command)
            offset, length = QF_BSWAP64(offset), QF_BSWAP32(length)
            if (magic != self.request_magic or length == 0 or offset > self.size
                    or length > self.size - offset):
                return PYTHON, rpos, rend, olen, 0
            # (a reply is packed at o + olen only once there is room for all of it)
            if command == self.cmd_read and self.image is not None:
                if (length >= self.read_below or flags & ~self.flag_df
                        or (flags and not self.structured)):
                    return PYTHON, rpos, rend, olen, 0
                need = (DATA_HEAD if self.structured else SIMPLE_HEAD) + length
            elif command == self.cmd_status and self.lookup is not None:
                if flags & ~self.status_flags:
                    return PYTHON, rpos, rend, olen, 0
                need = REPLY_HEAD + 8 * self.room
            else:
                return PYTHON, rpos, rend, olen, 0
            if olen + need > ocap:
                if need > ocap:
                    return PYTHON, rpos, rend, olen, 0
                with nogil:
                    got = _send_all(fd, o, olen)
                olen = 0
                if got < 0:
                    return PYTHON, rpos, rend, olen, -got
            if command == self.cmd_read:
                try:
                    got = self._read(obuf, olen, p, offset, length)
                except Exception as e:
                    self.failure = e
                    return FAILED, rpos, rend, olen, 0
            else:
                got = self._status(o + olen, p, offset, length, flags)
                if got == 0:
                    return PYTHON, rpos, rend, olen, 0
            olen += got
            rpos += REQUEST_SIZE

    def take_failure(self):
        """The exception of the READ that FAILED (once)."""
        e, self.failure = self.failure, None
        return e

    cdef inline void _chunk_head(self, char *out, const char *req, uint16_t rtype,
                                 uint32_t length) noexcept:
        """A structured reply chunk's header (the last chunk) for the
        request at ``req``, its payload ``length`` bytes."""
        cdef uint32_t *w = <uint32_t *>out
        w[0] = QF_BSWAP32(self.reply_magic)
        w[1] = QF_BSWAP32((<uint32_t>self.done << 16) | rtype)
        memcpy(out + 8, req + 8, 8)                     # the request's cookie, as sent
        w[4] = QF_BSWAP32(length)

    cdef Py_ssize_t _read(self, bytearray obuf, Py_ssize_t at, const char *req,
                          uint64_t offset, uint32_t length) except -1:
        """A READ's whole reply at ``obuf[at:]`` (room checked): its size."""
        cdef char *out = PyByteArray_AS_STRING(obuf) + at
        cdef uint32_t *w = <uint32_t *>out
        cdef Py_ssize_t head = DATA_HEAD if self.structured else SIMPLE_HEAD
        cdef int64_t got
        self.image._check_range(<int64_t>offset, length)
        got = self.image._locked_read(out + head, <int64_t>offset, length)
        if got < length:            # the rest, as ImageCore.readinto does
            self.image.read_fallback(<int64_t>offset + got,
                                     memoryview(obuf)[at + head + got:at + head + length])
        if self.structured:
            self._chunk_head(out, req, self.type_data, length + 8)
            memcpy(out + 20, req + 16, 8)               # its offset, as sent
        else:
            w[0] = QF_BSWAP32(self.simple_magic)
            w[1] = 0
            memcpy(out + 8, req + 8, 8)
        return head + length

    cdef Py_ssize_t _status(self, char *out, const char *req, uint64_t offset, uint32_t length,
                            uint16_t flags):
        """A lone bitmap's BLOCK_STATUS reply at ``out``: its size, or 0."""
        cdef uint32_t *w = <uint32_t *>out
        cdef Py_ssize_t n, most = 1 if flags & self.req_one else self.most
        cdef DirtyBitmap bitmap
        try:
            bitmap = self.lookup(self.name)
        except Exception:
            return 0
        n = bitmap.descriptors(<int64_t>offset, length, <uint32_t *>(out + REPLY_HEAD),
                               min(most, self.room))
        if n == self.room and n < most:
            return 0                                    # maybe more: Python counts them
        self._chunk_head(out, req, self.type_status, <uint32_t>(4 + 8 * n))
        w[5] = QF_BSWAP32(self.cid)
        return REPLY_HEAD + 8 * n
