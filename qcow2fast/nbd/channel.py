"""Buffered blocking socket I/O for one NBD connection.

Incoming bytes land in a receive buffer with one ``recv_into`` per burst,
so a client that pipelines requests (queue depth > 1) costs one system call
per burst, not per request; a WRITE payload already in that buffer is
handed to the image without a copy.  Replies are built in place in a send
buffer (a READ's data is read by the image straight into it, after room
for the reply header) and sent with one ``sendall`` when the connection is
about to wait for more input, or when the buffer is full.

Invariant: before blocking in ``recv_into`` the send buffer is empty, so a
client waiting for replies before sending more can never deadlock us.

Before sleeping for input the connection polls (_ext/nbdio.recv_polled,
qemu's adaptive polling): measured here, 4 KiB reads at queue depth 1
(``qemu-img bench -d 1`` over a Unix socket) took 1.1-1.6 s for 30000
instead of 3.0 s, and a 1 TiB bitmap's ``nbdinfo --map`` 16-18 ms instead
of 24-27 ms; depth 16 and 4 connections unchanged.  A poll that fails is
given up for a while: with the client on the same CPU it could not
succeed, and cost the client 50 us per request.
"""

import os
import threading

from .._ext.nbdio import CLOSED, FAILED, Polling, recv_polled

RECV_BUFFER = 256 << 10
SEND_FLUSH_AT = 256 << 10
KEEP_SEND_BUFFER = (8 << 20) + 4096

# The buffers of ended connections, reused by new ones: a new pair is
# zeroed and faulted in, about 0.1 ms, a good part of a short
# connection's set-up (nbdinfo, a backup tool's one request).
_spare = []
_spare_lock = threading.Lock()
MAX_SPARE = 4

# Each connection polls as the last one to end left off (nbdinfo's and
# backup tools' connections are short: what the last one found is the best
# guess for the next).
_last_polling = Polling()


class Disconnected(Exception):
    """The peer closed the connection (possibly in the middle of a message)."""


class Channel:
    def __init__(self, sock):
        self.sock = sock
        with _spare_lock:
            buffers = _spare.pop() if _spare else None
        self._rbuf, self._obuf = buffers or (bytearray(RECV_BUFFER), bytearray(SEND_FLUSH_AT))
        self._rmv = memoryview(self._rbuf)
        self._rpos = self._rend = 0
        self._omv = memoryview(self._obuf)
        self._olen = 0
        # (not through TLS: an SSLSocket takes no recv flags; nor with a
        # timeout, where Python's recv waits for input before any call)
        self._poll = sock.gettimeout() is None
        self._polling = Polling(_last_polling.rest, _last_polling.backoff)

    # -- receiving ---------------------------------------------------------------------

    def buffered(self):
        return self._rend - self._rpos

    def _fill(self, need):
        """Make at least ``need`` (<= RECV_BUFFER) bytes available."""
        if self._rend - self._rpos >= need:
            return
        if self._rpos:                       # compact: keep the unread tail at the front
            n = self._rend - self._rpos
            self._rmv[:n] = self._rmv[self._rpos:self._rend]
            self._rpos, self._rend = 0, n
        self.flush()
        while self._rend < need:
            got = self._recv_polled(self._rmv[self._rend:])
            if not got:
                raise Disconnected("the client closed the connection")
            self._rend += got

    def _recv_polled(self, mv):
        if self._poll:
            return recv_polled(self.sock.fileno(), mv, self._polling)
        return self.sock.recv_into(mv)

    @property
    def plain(self):
        """A blocking socket without TLS: C may do its I/O (serve_in_c)."""
        return self._poll

    def serve_in_c(self, loop):
        """Let ``loop`` (an nbdio.RequestLoop) answer the requests that are
        its own, from the buffers and then the socket, until the next one
        is not (it stays buffered).  Only on a ``plain`` connection.
        Returns the exception of that next request when it is a READ that
        failed in C (to be answered, not redone), else None."""
        how, self._rpos, self._rend, self._olen, err = loop.run(
            self.sock.fileno(), self._rbuf, self._rpos, self._rend, self._obuf, self._olen,
            self._polling)
        if err:
            raise OSError(err, os.strerror(err))
        if how == CLOSED:
            raise Disconnected("the client closed the connection")
        return loop.take_failure() if how == FAILED else None

    def peek(self, n):
        """The next ``n`` bytes if they are already received (not consumed),
        else None; never waits."""
        if self._rend - self._rpos < n:
            return None
        return self._rmv[self._rpos:self._rpos + n]

    def read(self, n):
        """The next ``n`` (<= RECV_BUFFER) bytes, as a memoryview valid until
        the next receive call."""
        self._fill(n)
        pos = self._rpos
        self._rpos += n
        return self._rmv[pos:pos + n]

    def readinto(self, mv):
        """Fill ``mv`` from the buffer, then straight from the socket."""
        n = len(mv)
        have = min(n, self._rend - self._rpos)
        mv[:have] = self._rmv[self._rpos:self._rpos + have]
        self._rpos += have
        if have < n:
            self.flush()
        while have < n:
            got = self.sock.recv_into(mv[have:])
            if not got:
                raise Disconnected("the client closed the connection in the middle of a "
                                   f"request ({have} of {n} bytes of payload received)")
            have += got

    def skip(self, n):
        """Discard ``n`` bytes of input (the payload of a refused write)."""
        while n:
            step = min(n, RECV_BUFFER)
            self.read(step)
            n -= step

    def starttls(self, context, timeout):
        """Upgrade the connection to TLS (NBD_OPT_STARTTLS, once its ACK is
        queued): the ACK is sent, then the handshake runs (bounded by
        ``timeout`` seconds).  The client sends nothing between its option
        and the handshake, so no plain input may be left buffered."""
        if self._rend - self._rpos:
            raise ValueError("the client sent data before the TLS handshake")
        self.flush()
        self._rpos = self._rend = 0
        self.sock.settimeout(timeout)
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self._poll = False
        self.sock.settimeout(None)

    def release(self):
        """The connection is over: keep its buffers for the next one (unless
        a view of them is still held somewhere), and what polling found."""
        _last_polling.rest, _last_polling.backoff = self._polling.rest, self._polling.backoff
        rbuf, obuf = self._rbuf, self._obuf
        self._rmv.release()
        self._omv.release()
        self._rbuf = self._obuf = self._rmv = self._omv = None
        try:
            for buf in (rbuf, obuf):        # (a bytearray still exported cannot grow)
                buf.append(0)
                buf.pop()
        except BufferError:
            return
        if len(obuf) == SEND_FLUSH_AT:
            with _spare_lock:
                if len(_spare) < MAX_SPARE:
                    _spare.append((rbuf, obuf))

    # -- sending ---------------------------------------------------------------------------

    def reserve(self, n):
        """A writable view of ``n`` bytes at the end of the send buffer; the
        bytes are sent only after ``commit(n)``."""
        if self._olen + n > len(self._obuf):
            if self._olen:
                self.flush()
            if n > len(self._obuf):
                self._obuf = bytearray(n)
                self._omv = memoryview(self._obuf)
        return self._omv[self._olen:self._olen + n]

    def commit(self, n):
        self._olen += n
        if self._olen >= SEND_FLUSH_AT:
            self.flush()

    def send(self, *parts):
        for data in parts:
            n = len(data)
            self.reserve(n)[:] = data
            self.commit(n)

    def flush(self):
        if self._olen:
            n, self._olen = self._olen, 0
            self.sock.sendall(self._omv[:n])
        if len(self._obuf) > KEEP_SEND_BUFFER:     # give back a huge read's buffer
            self._obuf = bytearray(SEND_FLUSH_AT)
            self._omv = memoryview(self._obuf)
