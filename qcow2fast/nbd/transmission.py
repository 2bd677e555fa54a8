"""The transmission phase (proto.md, "Transmission"): requests are read,
checked and dispatched one after the other on the connection's thread;
connections run in parallel on the shared, thread-safe image.

Every request gets exactly one reply (DISC none).  A request that fails
gets the protocol's error value; a WRITE is acknowledged only after the
image accepted all of it, and its payload is only written once it has
been received in full (a client that disconnects mid-payload writes
nothing).  Only a broken framing (bad request magic) drops the connection.
"""

import logging

from .._ext.core import ImageCore
from .._ext.nbdio import RequestLoop
from . import protocol as P
from .channel import Disconnected
from .contexts import bitmap_alone, send_block_status
from .export import HOLE_MIN, MAX_PAYLOAD, RequestError, nbd_error
from .handshake import ProtocolError

log = logging.getLogger("qcow2fast.nbd")

# Command flags each command accepts (FUA is valid on every command).
_F = P.NBD_CMD_FLAG_FUA
ALLOWED_FLAGS = {
    P.NBD_CMD_READ: _F | P.NBD_CMD_FLAG_DF,
    P.NBD_CMD_WRITE: _F,
    P.NBD_CMD_DISC: _F,
    P.NBD_CMD_FLUSH: _F,
    P.NBD_CMD_TRIM: _F,
    P.NBD_CMD_WRITE_ZEROES: _F | P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FAST_ZERO,
    P.NBD_CMD_BLOCK_STATUS: _F | P.NBD_CMD_FLAG_REQ_ONE,
    P.NBD_CMD_CACHE: _F,
}
WRITING = (P.NBD_CMD_WRITE, P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES)
NAMES = {P.NBD_CMD_READ: "READ", P.NBD_CMD_WRITE: "WRITE", P.NBD_CMD_DISC: "DISC",
         P.NBD_CMD_FLUSH: "FLUSH", P.NBD_CMD_TRIM: "TRIM", P.NBD_CMD_CACHE: "CACHE",
         P.NBD_CMD_WRITE_ZEROES: "WRITE_ZEROES", P.NBD_CMD_BLOCK_STATUS: "BLOCK_STATUS"}

# WRITE payload buffers up to this size are kept for the connection's next writes.
KEEP_WRITE_BUFFER = 8 << 20

# Pipelined WRITEs already received (with all their payload), and the READs
# among them or, where the C loop does not answer them (TLS), all small
# READs, go to the image together, as one batch (Image.submit: resolved and
# carried out in C with the GIL released once, as if in order), at most
# this many; their replies are built in place, in order.
BATCH_MAX = 64

_REQ = P.REQUEST
_SIMPLE = P.SIMPLE_REPLY
_CHUNK = P.STRUCTURED_REPLY
_DATA = P.OFFSET_DATA_REPLY
_HOLE = P.OFFSET_HOLE_REPLY
_DONE = P.NBD_REPLY_FLAG_DONE


class Transmission:
    def __init__(self, chan, export, session, peer=""):
        self.chan = chan
        self.export = export
        self.image = export.image
        self.structured = session.structured
        self.contexts = session.contexts
        self.peer = peer
        self.handlers = {
            P.NBD_CMD_READ: self.read,
            P.NBD_CMD_WRITE: self.write,
            P.NBD_CMD_FLUSH: self.flush,
            P.NBD_CMD_TRIM: self.trim,
            P.NBD_CMD_WRITE_ZEROES: self.write_zeroes,
            P.NBD_CMD_BLOCK_STATUS: self.block_status,
            P.NBD_CMD_CACHE: self.cache,
        }
        # WRITE goes straight to the image unless zeros are to be detected
        self._write = export.write if export.detect_zeroes != "off" else self.image.write
        self._submit = getattr(self.image, "submit", None)     # qcow2 images batch
        # WRITEs join batches when nothing stands between them and the image
        self._batch_writes = (self._submit is not None and not export.read_only
                              and export.detect_zeroes == "off")
        self._wbuf = None           # reused for WRITE payloads not already buffered
        # BLOCK_STATUS of one dirty bitmap: its chunk alone
        self._bitmap_alone = bitmap_alone(export, self.contexts)
        # On a plain connection small READs, and those BLOCK_STATUS
        # requests, are answered in C (nbdio.RequestLoop)
        self._c_loop = None
        if chan.plain:
            loop = RequestLoop(P, export.size, self.structured)
            if isinstance(self.image, ImageCore):
                loop.serve_reads(self.image, HOLE_MIN)
            if self._bitmap_alone is not None:
                self._bitmap_alone.serve_in_c(loop, ALLOWED_FLAGS[P.NBD_CMD_BLOCK_STATUS])
            self._c_loop = loop
        self._unread = 0

    def run(self):
        """Serve requests until NBD_CMD_DISC or the client goes away."""
        chan = self.chan
        handlers = self.handlers
        c_loop = self._c_loop
        failure = None
        while True:
            try:
                if c_loop is not None:
                    failure = chan.serve_in_c(c_loop)
                hdr = chan.read(_REQ.size)
            except Disconnected:
                return
            magic, flags, cmd, handle, offset, length = _REQ.unpack(hdr)
            if failure is not None:             # a READ that failed in C: answered here
                self.failed(cmd, handle, offset, length, failure)
                continue
            if magic != P.NBD_REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            if cmd == P.NBD_CMD_DISC:
                chan.flush()
                return
            if (cmd <= P.NBD_CMD_WRITE and self._submit is not None      # (READ 0, WRITE 1)
                    and self.batchable(cmd, flags, offset, length, 0)
                    and chan.peek((length if cmd == P.NBD_CMD_WRITE else 0) + _REQ.size)
                    is not None):
                self.batch(cmd, handle, offset, length)
                continue
            handler = handlers.get(cmd)
            # Payload bytes of this request still in the socket (a WRITE's,
            # until write() has received them).
            self._unread = length if cmd == P.NBD_CMD_WRITE else 0
            try:
                if handler is None:
                    raise RequestError(P.NBD_EINVAL, f"unknown command {cmd}")
                self.check(cmd, flags, offset, length)
                handler(handle, flags, offset, length)
            except Disconnected:
                raise
            except Exception as e:
                if self._unread:
                    chan.skip(self._unread)
                self.failed(cmd, handle, offset, length, e)

    def failed(self, cmd, handle, offset, length, e):
        """Answer a request that raised ``e`` with its error value (logged
        unless the protocol refused it)."""
        if not isinstance(e, RequestError):
            log.warning("%s: %s [%#x, +%#x]: %s: %s", self.peer,
                        NAMES.get(cmd, cmd), offset, length, type(e).__name__, e)
        self.error(handle, nbd_error(e), str(e), cmd == P.NBD_CMD_READ)

    def check(self, cmd, flags, offset, length):
        """Refuse, before touching the image, what the protocol rules out."""
        name = NAMES[cmd]
        if flags & ~ALLOWED_FLAGS[cmd]:
            raise RequestError(P.NBD_EINVAL, f"{name}: invalid flags {flags:#x}")
        if flags & P.NBD_CMD_FLAG_DF and not self.structured:
            raise RequestError(P.NBD_EINVAL, "DF without structured replies")
        if cmd in WRITING and self.export.read_only:
            raise RequestError(P.NBD_EPERM, f"{name} on a read-only export")
        if cmd in (P.NBD_CMD_READ, P.NBD_CMD_WRITE) and length > MAX_PAYLOAD:
            error = P.NBD_EOVERFLOW if flags & P.NBD_CMD_FLAG_DF else P.NBD_EINVAL
            raise RequestError(error, f"{name} of {length} bytes is larger than the "
                               f"maximum of {MAX_PAYLOAD}")
        if cmd != P.NBD_CMD_FLUSH and offset + length > self.export.size:
            # proto.md: ENOSPC for writes past the end, EINVAL otherwise.
            error = P.NBD_ENOSPC if cmd in WRITING else P.NBD_EINVAL
            raise RequestError(error, f"{name} [{offset}, {offset + length}) past the end "
                               f"of the export ({self.export.size} bytes)")

    def batchable(self, cmd, flags, offset, length, header):
        """A request the protocol allows whose reply is one data chunk (a
        READ) or one OK (a WRITE without FUA whose payload is received,
        after ``header`` more bytes): it may go in a batch."""
        if offset + length > self.export.size or length <= 0:
            return False
        if cmd == P.NBD_CMD_READ:
            return (length < HOLE_MIN and not flags & ~P.NBD_CMD_FLAG_DF
                    and (self.structured or not flags))
        return (cmd == P.NBD_CMD_WRITE and self._batch_writes and not flags
                and length <= MAX_PAYLOAD and self.chan.buffered() >= header + length)

    def batch(self, cmd, handle, offset, length):
        """This request and the batchable ones received right after it,
        carried out as one batch; each gets its reply, in order."""
        chan = self.chan
        # (a WRITE's payload is a view of the receive buffer: nothing is
        # received until the batch is done, so it stays valid)
        batch = [(cmd, handle, offset, length,
                  chan.read(length) if cmd == P.NBD_CMD_WRITE else None)]
        while len(batch) < BATCH_MAX:
            hdr = chan.peek(_REQ.size)
            if hdr is None:
                break
            magic, flags, cmd, handle, offset, length = _REQ.unpack(hdr)
            if magic != P.NBD_REQUEST_MAGIC or not self.batchable(cmd, flags, offset, length,
                                                                  _REQ.size):
                break
            chan.read(_REQ.size)
            batch.append((cmd, handle, offset, length,
                          chan.read(length) if cmd == P.NBD_CMD_WRITE else None))
        hsize = _DATA.size if self.structured else _SIMPLE.size
        osize = _CHUNK.size if self.structured else _SIMPLE.size
        mv = chan.reserve(sum(hsize + n if data is None else osize
                              for _, _, _, n, data in batch))
        reqs, pos = [], 0
        for _, _, off, n, data in batch:
            if data is None:
                reqs.append(("read", off, mv[pos + hsize:pos + hsize + n]))
                pos += hsize + n
            else:
                reqs.append(("write", off, data))
                pos += osize
        results = self._submit(reqs)
        if any(isinstance(r, BaseException) for r in results):
            # Rare: the data of the READs that succeeded leaves the send
            # buffer before the replies are sent one by one.
            datas = [bytes(buf) if data is None and not isinstance(r, BaseException) else None
                     for r, (_, _, buf), (_, _, _, _, data) in zip(results, reqs, batch)]
            for (cmd, h, off, n, _), r, data in zip(batch, results, datas):
                if isinstance(r, BaseException):
                    log.warning("%s: %s [%#x, +%#x]: %s: %s", self.peer, NAMES[cmd], off, n,
                                type(r).__name__, r)
                    self.error(h, nbd_error(r), str(r), cmd == P.NBD_CMD_READ)
                elif data is None:
                    self.ok(h)
                else:
                    self.data_reply(h, off, data)
            return
        pos = 0
        for _, h, off, n, data in batch:
            if data is None:
                self.pack_data_header(mv, pos, h, off, n)
                pos += hsize + n
            else:
                self.pack_ok(mv, pos, h)
                pos += osize
        chan.commit(pos)

    def pack_data_header(self, mv, pos, handle, offset, length):
        if self.structured:
            _DATA.pack_into(mv, pos, P.NBD_STRUCTURED_REPLY_MAGIC, _DONE,
                            P.NBD_REPLY_TYPE_OFFSET_DATA, handle, length + 8, offset)
        else:
            _SIMPLE.pack_into(mv, pos, P.NBD_SIMPLE_REPLY_MAGIC, 0, handle)

    def data_reply(self, handle, offset, data):
        hsize = _DATA.size if self.structured else _SIMPLE.size
        mv = self.chan.reserve(hsize + len(data))
        self.pack_data_header(mv, 0, handle, offset, len(data))
        mv[hsize:] = data
        self.chan.commit(hsize + len(data))

    # -- replies ---------------------------------------------------------------------------

    def ok(self, handle):
        osize = _CHUNK.size if self.structured else _SIMPLE.size
        self.pack_ok(self.chan.reserve(osize), 0, handle)
        self.chan.commit(osize)

    def pack_ok(self, mv, pos, handle):
        if self.structured:
            _CHUNK.pack_into(mv, pos, P.NBD_STRUCTURED_REPLY_MAGIC, _DONE, P.NBD_REPLY_TYPE_NONE,
                             handle, 0)
        else:
            _SIMPLE.pack_into(mv, pos, P.NBD_SIMPLE_REPLY_MAGIC, 0, handle)

    def error(self, handle, error, message, is_read=False):
        if self.structured:
            msg = message.encode("utf-8", "replace")[:P.MAX_STRING]
            self.chan.send(_CHUNK.pack(P.NBD_STRUCTURED_REPLY_MAGIC, _DONE,
                                       P.NBD_REPLY_TYPE_ERROR, handle,
                                       P.ERROR_PAYLOAD.size + len(msg)),
                           P.ERROR_PAYLOAD.pack(error, len(msg)), msg)
        else:
            # A failed simple READ reply carries no data (proto.md).
            self.chan.send(_SIMPLE.pack(P.NBD_SIMPLE_REPLY_MAGIC, error, handle))

    # -- commands -----------------------------------------------------------------------------

    def read(self, handle, flags, offset, length):
        chan = self.chan
        if self.structured:
            if not length:
                return self.ok(handle)
            if length >= HOLE_MIN:
                runs = self.export.read_runs(offset, length)
                if runs[0][0] and len(runs) == 1:
                    return chan.send(_HOLE.pack(P.NBD_STRUCTURED_REPLY_MAGIC, _DONE,
                                                P.NBD_REPLY_TYPE_OFFSET_HOLE, handle, 12,
                                                offset, length))
                if len(runs) > 1 and not flags & P.NBD_CMD_FLAG_DF:
                    return self.read_chunks(handle, runs)
        hsize = _DATA.size if self.structured else _SIMPLE.size
        mv = chan.reserve(hsize + length)
        self.pack_data_header(mv, 0, handle, offset, length)
        # The data goes from the image straight into the reply; nothing is
        # sent unless the whole read succeeded.
        self.image.readinto(offset, mv[hsize:])
        chan.commit(hsize + length)

    def read_chunks(self, handle, runs):
        """A structured READ reply of several chunks, in order: holes as
        OFFSET_HOLE, the rest as OFFSET_DATA.  The whole reply is built
        before any of it is sent (a failed read sends only its error)."""
        total = sum(_HOLE.size if hole else _DATA.size + n for hole, _, n in runs)
        mv = self.chan.reserve(total)
        pos = 0
        for i, (hole, off, n) in enumerate(runs):
            done = _DONE if i == len(runs) - 1 else 0
            if hole:
                _HOLE.pack_into(mv, pos, P.NBD_STRUCTURED_REPLY_MAGIC, done,
                                P.NBD_REPLY_TYPE_OFFSET_HOLE, handle, 12, off, n)
                pos += _HOLE.size
            else:
                _DATA.pack_into(mv, pos, P.NBD_STRUCTURED_REPLY_MAGIC, done,
                                P.NBD_REPLY_TYPE_OFFSET_DATA, handle, n + 8, off)
                pos += _DATA.size
                self.image.readinto(off, mv[pos:pos + n])
                pos += n
        self.chan.commit(total)

    def cache(self, handle, flags, offset, length):
        if length:
            self.export.cache(offset, length)
        self.ok(handle)

    def write(self, handle, flags, offset, length):
        chan = self.chan
        if chan.buffered() >= length:
            data = chan.read(length)            # already received: no copy
        else:
            if length > KEEP_WRITE_BUFFER:          # a rare huge write: not kept
                buf = bytearray(length)
            else:
                if self._wbuf is None or len(self._wbuf) < length:
                    self._wbuf = bytearray(max(length, 64 << 10))
                buf = self._wbuf
            data = memoryview(buf)[:length]
            chan.readinto(data)
        self._unread = 0
        self._write(offset, data)
        if flags & P.NBD_CMD_FLAG_FUA:
            self.image.flush()
        self.ok(handle)

    def flush(self, handle, flags, offset, length):
        # The image is shared by every connection: this covers all their writes.
        self.image.flush()
        self.ok(handle)

    def trim(self, handle, flags, offset, length):
        if length:
            self.export.trim(offset, length)
            if flags & P.NBD_CMD_FLAG_FUA:
                self.image.flush()
        self.ok(handle)

    def write_zeroes(self, handle, flags, offset, length):
        may_unmap = not flags & P.NBD_CMD_FLAG_NO_HOLE
        if flags & P.NBD_CMD_FLAG_FAST_ZERO and not self.export.zeroing_is_fast(may_unmap):
            raise RequestError(P.NBD_ENOTSUP, "zeroing this export is not fast")
        if length:
            self.export.write_zeroes(offset, length, may_unmap)
            if flags & P.NBD_CMD_FLAG_FUA:
                self.image.flush()
        self.ok(handle)

    def block_status(self, handle, flags, offset, length):
        if not self.contexts:
            raise RequestError(P.NBD_EINVAL, "BLOCK_STATUS without a metadata context")
        if not length:
            raise RequestError(P.NBD_EINVAL, "BLOCK_STATUS of 0 bytes")
        req_one = bool(flags & P.NBD_CMD_FLAG_REQ_ONE)
        if self._bitmap_alone is not None:
            self._bitmap_alone(self.chan, handle, offset, length, req_one)
        else:
            send_block_status(self.chan, self.export, handle, offset, length, self.contexts,
                              req_one)
