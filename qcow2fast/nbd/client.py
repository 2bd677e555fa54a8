"""An NBD client (doc/proto.md): what qemu-img does with an ``nbd://`` or
``nbd+unix://`` name (qemu's block/nbd.c) -- reads, the block status of
``base:allocation``, and writes, zeroes and flushes for a conversion into
an export (ops/nbd_target.py).  Remote images (host/remote.py) are read
through it as through any other URL, so a qcow2 image exported raw
(``qemu-nbd -f raw``) opens as qcow2, and a raw export maps as qemu-img
maps it.

Names, as qemu parses them (``nbd_parse_uri``):
``nbd[+tcp]://HOST[:PORT]/EXPORT`` (port 10809), ``nbd+unix:///EXPORT?socket=PATH``;
the export defaults to the empty (default) name.

Every reply is checked against the request (cookie, offsets within the
request, chunk sizes bounded) before its bytes are used; a server that
breaks the protocol is an error naming the name and the field, and the
connection is not used again.  Requests are pipelined: the block cache's
threads (and a call's pieces) have any number in flight on one connection,
the replies read by whichever caller waits and given to their requests by
cookie, data straight into the caller's buffer.  Writes past the export's end, or to a
read-only export, are refused before anything is sent."""

import socket
import ssl
import struct
import threading
import urllib.parse

from ..errors import InvalidArgumentError
from ..host.sockets import connect
from . import protocol as P
from .channel import RECV_BUFFER, Channel, Disconnected

DEFAULT_PORT = 10809
SCHEMES = ("nbd", "nbd+tcp", "nbd+unix")
MAX_READ = 32 << 20                 # the largest read asked at once (qemu: 32 MiB)
MAX_WRITE = 4 << 20                 # the largest write sent at once (below every server's max)
MAX_ZERO = 1 << 30                  # the largest write-zeroes range sent at once
# Bytes of reads and writes in flight on one connection before a request
# waits (one larger request always goes): many small requests overlap the
# server's work with ours; large ones gain nothing from it here (2 CPUs:
# four 4 MiB reads at once ran at half the speed of one at a time).
IN_FLIGHT = 1 << 20
BAD_URI = "No valid URL specified"  # qemu's words


# qemu's names of options and words for refusals (nbd/common.c, nbd/client.c).
OPTION_NAMES = {P.NBD_OPT_EXPORT_NAME: "export name", P.NBD_OPT_ABORT: "abort",
                P.NBD_OPT_LIST: "list", P.NBD_OPT_STARTTLS: "starttls", P.NBD_OPT_INFO: "info",
                P.NBD_OPT_GO: "go", P.NBD_OPT_STRUCTURED_REPLY: "structured reply",
                P.NBD_OPT_LIST_META_CONTEXT: "list meta context",
                P.NBD_OPT_SET_META_CONTEXT: "set meta context"}
REFUSALS = {
    P.NBD_REP_ERR_POLICY: "Denied by server for option {opt} ({name})",
    P.NBD_REP_ERR_INVALID: "Invalid parameters for option {opt} ({name})",
    P.NBD_REP_ERR_PLATFORM: "Server lacks support for option {opt} ({name})",
    P.NBD_REP_ERR_TLS_REQD: "TLS negotiation required before option {opt} ({name})",
    P.NBD_REP_ERR_UNKNOWN: "Requested export not available",
    P.NBD_REP_ERR_SHUTDOWN: "Server shutting down before option {opt} ({name})",
    P.NBD_REP_ERR_BLOCK_SIZE_REQD: "Server requires INFO_BLOCK_SIZE for option {opt} ({name})",
}
X509_V_ERR_HOSTNAME_MISMATCH = 62       # OpenSSL's verify code


class NbdError(OSError):
    """The server refused, broke the protocol, or went away (its message
    is qemu's; the caller names the image)."""

    def __str__(self):
        return self.strerror


def parse_uri(uri):
    """(socket address family, address, export name) of an NBD URI."""
    u = urllib.parse.urlsplit(uri)
    scheme = u.scheme.lower()
    if scheme not in SCHEMES:
        raise InvalidArgumentError(f"{uri!r} is not an NBD URI ({', '.join(SCHEMES)})")
    export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
    query = urllib.parse.parse_qs(u.query)
    if scheme == "nbd+unix":
        if u.netloc or list(query) != ["socket"] or len(query["socket"]) != 1:
            raise InvalidArgumentError(BAD_URI)         # (it takes one ?socket=PATH)
        return socket.AF_UNIX, query["socket"][0], export
    try:
        port = u.port
    except ValueError:                                  # (not a number, or past 65535)
        raise InvalidArgumentError(BAD_URI) from None
    if query or not u.hostname:
        raise InvalidArgumentError(BAD_URI)             # (a host, and no query)
    return socket.AF_INET6 if ":" in u.hostname else socket.AF_INET, \
        (u.hostname, port or DEFAULT_PORT), export


# qemu's nbd driver options (block/nbd.c), flattened; the legacy host/port/path too.
NODE_OPTIONS = ("driver", "server.type", "server.host", "server.port", "server.path",
                "host", "port", "path", "export", "x-dirty-bitmap")


def uri_of(options):
    """(URI, x-dirty-bitmap or None) of an nbd node's options (flattened
    keys: ``server.type``, ``server.path``..., values as given); the URI
    as qemu names the node (no ``/`` for the default export)."""
    bad = [key for key in options if key not in NODE_OPTIONS]
    if bad:
        raise InvalidArgumentError(f"Block protocol 'nbd' doesn't support the option '{bad[0]}'")
    get = {k: str(v) for k, v in options.items()}.get
    kind = get("server.type") or ("unix" if get("path") else "inet")
    export = get("export") or ""
    if kind == "unix":
        path = get("server.path") or get("path")
        if not path:
            raise InvalidArgumentError("Parameter 'server.path' is missing")
        return _uri(socket.AF_UNIX, path, export), get("x-dirty-bitmap")
    if kind == "inet":
        host = get("server.host") or get("host")
        if not host:
            raise InvalidArgumentError("Parameter 'server.host' is missing")
        port = get("server.port") or get("port") or str(DEFAULT_PORT)
        if not port.isdigit():
            raise InvalidArgumentError(f"address resolution failed for {host}:{port}: "
                                       "Servname not supported for ai_socktype")
        if int(port) > 0xFFFF:          # (qemu connects to the port's low 16 bits)
            raise InvalidArgumentError(f"Failed to connect to '{host}:{port}': the port is "
                                       "not in 0..65535")
        return _uri(socket.AF_INET, (host, port), export), get("x-dirty-bitmap")
    raise InvalidArgumentError(f"Parameter 'server.type' does not accept value '{kind}'")


def canonical(uri):
    """The name qemu shows for an NBD URI (nbd_refresh_filename): the port
    always, no ``/`` before an empty export name."""
    return _uri(*parse_uri(uri))


def _uri(family, address, export):
    tail = "/" + urllib.parse.quote(export, safe="") if export else ""
    if family == socket.AF_UNIX:
        return f"nbd+unix://{tail}?socket={urllib.parse.quote(address, safe='/')}"
    host, port = address
    return f"nbd://{'[' + host + ']' if ':' in host else host}:{port}{tail}"


class Negotiation:
    """The handshake's option haggling (doc/proto.md) on a connected
    socket: shared by the client of one export and the export listing
    (nbd/listing.py)."""

    refused = None                  # the last option error reply: (type, message)

    def _greet(self, tls=None, hostname=None):
        """The fixed-newstyle greeting, then TLS with the SSLContext
        ``tls`` (the server's name checked against ``hostname``); True if
        the server took structured replies."""
        magic, opt, flags = P.SERVER_GREETING.unpack(self._recv(P.SERVER_GREETING.size))
        if magic != P.NBDMAGIC or opt != P.IHAVEOPT:
            self._fail("greeting", "not an NBD newstyle server")
        if not flags & P.NBD_FLAG_FIXED_NEWSTYLE:
            self._fail("handshake flags", "the server is not fixed-newstyle")
        self._sock.sendall(P.CLIENT_FLAGS.pack(
            P.NBD_FLAG_C_FIXED_NEWSTYLE | (flags & P.NBD_FLAG_C_NO_ZEROES)))
        if tls is not None:
            self._starttls(tls, hostname)
        return self._option(P.NBD_OPT_STRUCTURED_REPLY, b"") == []

    def _starttls(self, context, hostname):
        if self._option(P.NBD_OPT_STARTTLS, b"") is None:
            rtype, _ = self.refused
            if rtype == P.NBD_REP_ERR_UNSUP:
                raise NbdError(95, "Server does not support STARTTLS")
            raise self.refusal(P.NBD_OPT_STARTTLS)
        if context.check_hostname and not hostname:
            raise NbdError(22, "No hostname for certificate validation")
        try:
            self._sock = context.wrap_socket(self._sock, server_hostname=hostname)
        except ssl.SSLCertVerificationError as e:
            if e.verify_code == X509_V_ERR_HOSTNAME_MISMATCH:
                raise NbdError(71, f"Certificate does not match the hostname {hostname}") \
                    from None
            raise NbdError(71, f"TLS handshake failed: {e.verify_message}") from None
        except (ssl.SSLError, OSError) as e:
            raise NbdError(71, f"TLS handshake failed: {e}") from None
        self._chan = Channel(self._sock)    # (nothing was buffered after the ACK)

    def refusal(self, option):
        """The last error reply to ``option`` in qemu's words
        (nbd_handle_reply_err): what, and what the server said."""
        rtype, message = self.refused
        name = OPTION_NAMES.get(option, "<unknown>")
        what = REFUSALS.get(rtype, "Unknown error code when asking for option {opt} ({name})")
        text = what.format(opt=option, name=name)
        if rtype == P.NBD_REP_ERR_TLS_REQD:
            text += "\nDid you forget a valid tls-creds?"
        if message:
            text += f"\nserver reported: {message}"
        return NbdError(5, text)

    def _option(self, option, data):
        """Send an option; its replies [(type, data)] up to the ACK, or None
        when the server refuses it (an error reply: ``refused``)."""
        self._sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)) + data)
        out = []
        while True:
            magic, opt, rtype, length = P.OPTION_REPLY.unpack(self._recv(P.OPTION_REPLY.size))
            if magic != P.NBD_OPT_REPLY_MAGIC or opt != option:
                self._fail("option reply", f"magic {magic:#x} for option {opt}")
            if length > 2 * P.MAX_STRING + 64:     # (a name and a description)
                self._fail("option reply", f"{length} bytes of reply data")
            payload = self._recv(length)
            if rtype & P.NBD_REP_FLAG_ERROR:
                self.refused = rtype, payload.decode(errors="replace")
                if option == P.NBD_OPT_GO:
                    message = payload.decode(errors="replace") or f"error {rtype:#x}"
                    raise NbdError(5, f"Requested export not available: {message}")
                return None
            if rtype == P.NBD_REP_ACK:
                return out
            out.append((rtype, payload))

    def _recv(self, n):
        if n <= RECV_BUFFER:
            return bytes(self._read(self._chan.read, n))
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return buf

    def _recv_into(self, mv):
        self._read(self._chan.readinto, mv)

    @staticmethod
    def _read(how, arg):
        try:
            return how(arg)
        except Disconnected:
            raise NbdError(5, "the server closed the connection") from None

    def _fail(self, field, why):
        raise NbdError(71, f"protocol error in {field}: {why}")          # EPROTO


class NbdClient(Negotiation):
    """One connection to one export, negotiated with structured replies
    and ``base:allocation`` when the server has them."""

    def __init__(self, uri, timeout=30.0, context=None):
        """``context``: the metadata context block status reports (qemu's
        x-dirty-bitmap: its flags read as base:allocation's); default
        base:allocation."""
        self.name = uri
        self.context = context or P.BASE_ALLOCATION
        family, address, self.export = parse_uri(uri)
        self._send_lock = threading.Lock()       # one request on the wire at a time
        self._cond = threading.Condition(threading.Lock())  # guards the fields below
        self._pending = {}                       # cookie -> _Pending
        self._in_flight = 0                      # bytes read or written by them
        self._reading = False                    # a thread is reading the socket
        self._waiters = 0                        # threads waiting on _cond
        self._broken = None                      # the error that lost the connection
        self._cookie = 0
        self._sock = connect(address, timeout, NbdError)
        # Replies are received through a buffer (one recv per burst: a
        # chunk's header and offset and the start of its data together).
        self._chan = Channel(self._sock)
        try:
            self._handshake()
        except BaseException:
            self._sock.close()
            raise

    # -- negotiation --------------------------------------------------------------------

    def _handshake(self):
        self.structured = self._greet()
        self.allocation_id = None
        if self.structured:
            name = self.context.encode()
            replies = self._option(P.NBD_OPT_SET_META_CONTEXT,
                                   _string32(self.export) + P.U32.pack(1) + _string32(name))
            for rtype, data in replies or ():
                if rtype == P.NBD_REP_META_CONTEXT and data[4:] == name:
                    self.allocation_id = P.META_CONTEXT_ID.unpack_from(data)[0]
        if self.allocation_id is None and self.context != P.BASE_ALLOCATION:
            raise NbdError(22, f"requested x-dirty-bitmap {self.context} not found")
        replies = self._option(P.NBD_OPT_GO, _string32(self.export) + P.U16.pack(0))
        if replies is None:
            self._fail("NBD_OPT_GO", f"the server has no export {self.export!r}")
        self.size = None
        for rtype, data in replies:
            if rtype == P.NBD_REP_INFO and len(data) >= P.INFO_EXPORT.size and \
                    P.INFO_TYPE.unpack_from(data)[0] == P.NBD_INFO_EXPORT:
                _, self.size, self.flags = P.INFO_EXPORT.unpack_from(data)
        if self.size is None:
            self._fail("NBD_OPT_GO", "no export size in the reply")

    # -- transmission -------------------------------------------------------------------
    #
    # Requests are pipelined: any thread sends (under the send lock) and then
    # waits for its reply.  Of the threads waiting, one at a time reads the
    # socket (``_reading``, under ``_cond``): it takes the next reply or chunk,
    # whoever it is for, hands it to that request (a read's data is received
    # straight into the caller's buffer) and wakes the others.  A connection
    # that failed mid-reply (protocol error, timeout, closed) is ``_broken``:
    # every request waiting on it, and every later one, gets that error.

    def pread(self, start, end):
        """The bytes [start, end) of the export."""
        out = bytearray(end - start)
        self.readinto(start, out)
        return bytes(out)

    def readinto(self, offset, buf):
        """Fill ``buf`` with the export's bytes at ``offset`` (the block
        cache's ``fetch_into``: data chunks are received straight into it)."""
        mv = memoryview(buf).cast("B")
        self._all(self._send(P.NBD_CMD_READ, offset + at, min(MAX_READ, len(mv) - at),
                             read=(offset + at, mv[at:at + MAX_READ]))
                  for at in range(0, len(mv), MAX_READ))

    def block_status(self, offset, length):
        """[(length, flags)] from ``offset``: at least one descriptor,
        covering at most ``length`` (of base:allocation, or the context
        asked for); None when the server has no such context."""
        if self.allocation_id is None:
            return None
        out = []
        for rtype, flags, payload in self._wait(self._send(
                P.NBD_CMD_BLOCK_STATUS, offset, min(length, 0xFFFFFFFF))):
            if rtype == P.NBD_REPLY_TYPE_BLOCK_STATUS and len(payload) >= 4 and \
                    P.U32.unpack_from(payload)[0] == self.allocation_id:
                out += [P.BLOCK_DESCRIPTOR.unpack_from(payload, k)
                        for k in range(4, len(payload) - 7, P.BLOCK_DESCRIPTOR.size)]
        if not out or any(n == 0 for n, _ in out):
            self._fail("NBD_REPLY_TYPE_BLOCK_STATUS", "no extent, or an empty one")
        return out

    @property
    def read_only(self):
        return bool(self.flags & P.NBD_FLAG_READ_ONLY)

    def pwrite(self, data, offset):
        """Write ``data`` at ``offset`` of the export."""
        mv = memoryview(data).cast("B")
        self._writable(offset, len(mv))
        self._all(self._send(P.NBD_CMD_WRITE, offset + at, len(mv[at:at + MAX_WRITE]),
                             mv[at:at + MAX_WRITE])
                  for at in range(0, len(mv), MAX_WRITE))

    def write_zeroes(self, offset, length):
        """Make [offset, offset+length) read as zeros (NBD_CMD_WRITE_ZEROES,
        or written zeros when the server has no such command)."""
        self._writable(offset, length)
        zero = self.flags & P.NBD_FLAG_SEND_WRITE_ZEROES
        step = MAX_ZERO if zero else MAX_WRITE
        pieces = [(at, min(step, offset + length - at))
                  for at in range(offset, offset + length, step)]
        self._all(self._send(P.NBD_CMD_WRITE_ZEROES, at, n) if zero else
                  self._send(P.NBD_CMD_WRITE, at, n, bytes(n)) for at, n in pieces)

    def flush(self):
        """Make the completed writes stable (when the server can)."""
        if self.flags & P.NBD_FLAG_SEND_FLUSH:
            self._all([self._send(P.NBD_CMD_FLUSH, 0, 0)])

    def _writable(self, offset, length):
        if self.read_only:
            raise NbdError(30, f"the export of {self.name} is read-only")      # EROFS
        if offset < 0 or offset + length > self.size:
            raise NbdError(28, f"write [{offset}, {offset + length}) past the end of the "
                               f"{self.size}-byte export of {self.name}")     # ENOSPC

    def _send(self, command, offset, length, payload=None, read=None):
        """Send a request; its _Pending, registered before the first byte
        goes out (the reply may come before sendall returns).  A read or
        write waits (reading replies meanwhile) while the bytes in flight
        would pass IN_FLIGHT: one large request at a time, many small ones."""
        size = length if command in (P.NBD_CMD_READ, P.NBD_CMD_WRITE) else 0
        with self._send_lock:
            if size and self._in_flight:
                self._progress(lambda: not self._in_flight or
                               self._in_flight + size <= IN_FLIGHT)
            if self._broken is not None:
                raise self._broken
            self._cookie += 1
            p = _Pending(self._cookie, command, read, size)
            with self._cond:
                self._pending[p.cookie] = p
                self._in_flight += size
            try:
                self._sock.sendall(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, command, p.cookie,
                                                  offset, length))
                if payload is not None:
                    self._sock.sendall(payload)
            except BaseException as e:
                self._break(e)          # (a request half sent: the stream is lost)
                raise
            return p

    def _all(self, pendings):
        """Wait for every request sent (a generator sends them all first, in
        order, for the server to work on together); the first error is
        raised once none of them is in flight, so no reply lands in a
        caller's buffer after the call returned."""
        pendings = list(pendings)
        error = None
        for p in pendings:
            try:
                self._wait(p)
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error

    def _wait(self, p):
        """The chunks of ``p``'s reply (its data already in its buffer)."""
        if not p.done:
            self._progress(lambda: p.done)
        if p.error is not None:
            raise p.error
        return p.chunks

    def _progress(self, until):
        """Return once ``until()`` holds (a request done, room to send),
        reading the socket for every waiting thread meanwhile."""
        cond = self._cond
        while True:
            with cond:
                while not until() and self._reading:
                    self._waiters += 1
                    cond.wait()
                    self._waiters -= 1
                if until() or self._broken is not None:
                    return
                self._reading = True
            try:
                self._receive()
            except BaseException as e:
                self._break(e)
                raise
            finally:
                with cond:
                    self._reading = False
                    if self._waiters:
                        cond.notify_all()

    def _receive(self):
        """Read one reply (simple) or one chunk (structured) and give it to
        its request; the request is done at a simple reply or a DONE chunk."""
        if self._broken is not None:
            raise self._broken
        head = self._recv(4)
        magic = P.U32.unpack(head)[0]
        if magic == P.NBD_SIMPLE_REPLY_MAGIC:
            _, error, cookie = P.SIMPLE_REPLY.unpack(head + self._recv(P.SIMPLE_REPLY.size - 4))
            p = self._pending.get(cookie)
            if p is None or (p.read is not None and self.structured):
                self._fail("reply", f"a simple reply to cookie {cookie}")
            if error:
                p.error = NbdError(error, f"the server failed the request (error {error})")
            elif p.read is not None:
                self._recv_into(p.read[1])
            self._finish(p)
            return
        if magic != P.NBD_STRUCTURED_REPLY_MAGIC or not self.structured:
            self._fail("reply", f"magic {magic:#x}")
        _, flags, rtype, cookie, length = P.STRUCTURED_REPLY.unpack(
            head + self._recv(P.STRUCTURED_REPLY.size - 4))
        p = self._pending.get(cookie)
        if p is None:
            self._fail("structured reply", f"cookie {cookie}, not a request in flight")
        if length > MAX_READ + 64:
            self._fail("structured reply", f"a {length}-byte chunk")
        if p.read is not None and rtype == P.NBD_REPLY_TYPE_OFFSET_DATA:
            offset, mv = p.read
            if length < 8:
                self._fail("NBD_REPLY_TYPE_OFFSET_DATA", f"{length} bytes")
            at = struct.unpack(">Q", self._recv(8))[0] - offset
            if at < 0 or at + length - 8 > len(mv):
                self._fail("NBD_REPLY_TYPE_OFFSET_DATA", "data outside the request")
            self._recv_into(mv[at:at + length - 8])
        else:
            payload = self._recv(length)
            if rtype & (1 << 15):           # an error chunk (the first one counts)
                error = P.ERROR_PAYLOAD.unpack_from(payload)[0] if len(payload) >= 6 else 5
                p.error = p.error or NbdError(error, f"the server failed the request "
                                                     f"(error {error})")
            elif p.read is not None and rtype == P.NBD_REPLY_TYPE_OFFSET_HOLE:
                self._hole(p.read, payload)
            elif rtype != P.NBD_REPLY_TYPE_NONE and not (
                    rtype == P.NBD_REPLY_TYPE_BLOCK_STATUS and
                    p.command == P.NBD_CMD_BLOCK_STATUS):
                self._fail("structured reply", f"chunk type {rtype} to command {p.command}")
            elif rtype != P.NBD_REPLY_TYPE_NONE:
                p.chunks.append((rtype, flags, payload))
        if flags & P.NBD_REPLY_FLAG_DONE:
            self._finish(p)

    def _hole(self, read, payload):
        offset, mv = read
        if len(payload) != 12:
            self._fail("NBD_REPLY_TYPE_OFFSET_HOLE", f"{len(payload)} bytes")
        hole, length = struct.unpack_from(">QI", payload)
        at = hole - offset
        if at < 0 or at + length > len(mv):
            self._fail("NBD_REPLY_TYPE_OFFSET_HOLE", "hole outside the request")
        mv[at:at + length] = bytes(length)

    def _finish(self, p):
        with self._cond:
            del self._pending[p.cookie]
            self._in_flight -= p.size
            p.done = True

    def _break(self, e):
        """The connection is lost (``e`` happened mid-reply or mid-request):
        every request in flight fails with it, the socket is closed."""
        with self._cond:
            if self._broken is None:
                self._broken = e if isinstance(e, NbdError) else \
                    NbdError(5, f"the connection to the server failed: {e}")
            for p in self._pending.values():
                p.error, p.done = p.error or self._broken, True
            self._pending.clear()
            self._in_flight = 0
            self._cond.notify_all()
        self._sock.close()

    def _fail(self, field, why):
        e = NbdError(71, f"protocol error in {field}: {why}")          # EPROTO
        self._break(e)
        raise e

    def close(self):
        try:
            with self._send_lock:
                if self._broken is None:
                    self._sock.sendall(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_DISC,
                                                      self._cookie + 1, 0, 0))
        except OSError:
            pass
        self._sock.close()


class _Pending:
    """A request in flight: its command; ``read`` (offset, buffer) for a read; the
    chunks of its reply that carry no data; its error; done once its last
    reply (chunk) was read.  Changed only by the thread reading the socket
    (``done`` and the pending table under the condition)."""
    __slots__ = ("cookie", "command", "read", "size", "chunks", "error", "done")

    def __init__(self, cookie, command, read, size):
        self.cookie, self.command, self.read, self.size = cookie, command, read, size
        self.chunks, self.error, self.done = [], None, False


def _string32(s):
    b = s.encode() if isinstance(s, str) else s
    return P.U32.pack(len(b)) + b
