"""The fixed newstyle handshake and option haggling (proto.md, "Handshake").

``negotiate()`` runs it on a fresh connection and returns the ``Session``
the transmission phase needs, or None when the client ends the session
(NBD_OPT_ABORT).  Malformed options are answered with NBD_REP_ERR_INVALID
(and the haggling goes on); unknown ones with NBD_REP_ERR_UNSUP.  Only a
broken framing (bad magic, unknown client flags, an option too long to
be anything but abuse) ends the connection.
"""

import logging
import ssl

from . import protocol as P
from .export import MAX_PAYLOAD, PREFERRED_BLOCK
from .authz import peer_identity
from .tls import HANDSHAKE_TIMEOUT

log = logging.getLogger("qcow2fast.nbd")

# Option data longer than this ends the connection (names and queries are
# at most 4 KiB each; a few of them fit easily).
MAX_OPTION_DATA = 64 << 10


class ProtocolError(Exception):
    """The client broke the protocol's framing: the connection is dropped."""


class Session:
    """What option haggling agreed on."""

    def __init__(self):
        self.structured = False
        self.no_zeroes = False
        self.tls = False            # the connection was upgraded by NBD_OPT_STARTTLS
        self.contexts = []          # [(name, id)] selected by NBD_OPT_SET_META_CONTEXT


class _Invalid(Exception):
    """Malformed option data: answered with NBD_REP_ERR_INVALID."""


class _Reader:
    """Parses an option's data, checking every length against what is left."""

    def __init__(self, data):
        self.data, self.pos = bytes(data), 0

    def take(self, n):
        if n > len(self.data) - self.pos:
            raise _Invalid(f"option data too short ({len(self.data)} bytes)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self):
        return P.U16.unpack(self.take(2))[0]

    def u32(self):
        return P.U32.unpack(self.take(4))[0]

    def string(self):
        n = self.u32()
        if n > P.MAX_STRING:
            raise _Invalid(f"string of {n} bytes (the limit is {P.MAX_STRING})")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise _Invalid("string is not valid UTF-8") from None

    def end(self):
        if self.pos != len(self.data):
            raise _Invalid(f"{len(self.data) - self.pos} unexpected bytes of option data")


def negotiate(chan, export, tls=None, tls_authz=None):
    """Run the handshake on ``chan``; returns the Session to enter
    transmission with, or None when the client aborted.  With ``tls`` (an
    ``ssl.SSLContext``) TLS is required: nothing but NBD_OPT_STARTTLS is
    served before the upgrade; ``tls_authz`` (nbd/authz.py) then decides
    whether the client's certificate may go on (when the context asks
    for one, as qemu: not with verify-peer=off)."""
    chan.send(P.SERVER_GREETING.pack(P.NBDMAGIC, P.IHAVEOPT,
                                     P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES))
    (cflags,) = P.CLIENT_FLAGS.unpack(chan.read(4))
    if cflags & ~(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES):
        raise ProtocolError(f"unknown client flags {cflags:#x}")
    session = Session()
    session.no_zeroes = bool(cflags & P.NBD_FLAG_C_NO_ZEROES)
    haggler = _Options(chan, export, session, tls, tls_authz)
    while True:
        magic, option, length = P.OPTION_HEADER.unpack(chan.read(P.OPTION_HEADER.size))
        if magic != P.IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            haggler.reply(option, P.NBD_REP_ERR_TOO_BIG,
                          f"option data of {length} bytes is too long".encode())
            chan.flush()
            raise ProtocolError(f"option {option} with {length} bytes of data")
        data = chan.read(length) if length else b""
        done = haggler.handle(option, data)
        if done is not None:
            chan.flush()
            return session if done else None


class _Options:
    """One handler per option; each returns None to go on haggling, True
    to enter transmission, False to end the session."""

    def __init__(self, chan, export, session, tls=None, tls_authz=None):
        self.chan, self.export, self.session = chan, export, session
        self.tls, self.tls_authz = tls, tls_authz
        self.handlers = {
            P.NBD_OPT_EXPORT_NAME: self.export_name,
            P.NBD_OPT_ABORT: self.abort,
            P.NBD_OPT_LIST: self.list,
            P.NBD_OPT_STARTTLS: self.starttls,
            P.NBD_OPT_INFO: self.info,
            P.NBD_OPT_GO: self.go,
            P.NBD_OPT_STRUCTURED_REPLY: self.structured_reply,
            P.NBD_OPT_LIST_META_CONTEXT: self.list_meta_context,
            P.NBD_OPT_SET_META_CONTEXT: self.set_meta_context,
        }

    def reply(self, option, rtype, data=b""):
        self.chan.send(P.OPTION_REPLY.pack(P.NBD_OPT_REPLY_MAGIC, option, rtype, len(data)),
                       data)

    def error(self, option, rtype, message):
        self.reply(option, rtype, message.encode()[:P.MAX_STRING])

    def handle(self, option, data):
        if self.tls is not None and not self.session.tls and option != P.NBD_OPT_STARTTLS:
            return self.before_tls(option)
        handler = self.handlers.get(option)
        if handler is None:
            self.error(option, P.NBD_REP_ERR_UNSUP, f"option {option} is not supported")
            return None
        try:
            return handler(option, _Reader(data))
        except _Invalid as e:
            self.error(option, P.NBD_REP_ERR_INVALID, str(e))
            return None

    # -- ending the haggling ---------------------------------------------------------------

    def export_name(self, option, r):
        name = r.take(len(r.data)).decode("utf-8", "replace")
        if not self.export.matches(name):
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME: no export named {name!r}")
        ex = self.export
        self.chan.send(P.EXPORT_NAME_REPLY.pack(
            ex.size, ex.transmission_flags(self.session.structured)))
        if not self.session.no_zeroes:
            self.chan.send(P.EXPORT_NAME_PADDING)
        return True

    def abort(self, option, r):
        self.reply(option, P.NBD_REP_ACK)
        return False

    def go(self, option, r):
        return True if self._describe(option, r) else None

    def info(self, option, r):
        self._describe(option, r)

    def _describe(self, option, r):
        """NBD_OPT_INFO / NBD_OPT_GO: describe the export; False when there
        is no export of that name."""
        name = r.string()
        wanted = [r.u16() for _ in range(r.u16())]
        r.end()
        ex = self.export
        if not ex.matches(name):
            self.error(option, P.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return False
        flags = ex.transmission_flags(self.session.structured)
        self.reply(option, P.NBD_REP_INFO, P.INFO_EXPORT.pack(P.NBD_INFO_EXPORT, ex.size, flags))
        # Sent unasked too: a minimum of 1 imposes nothing on the client.
        self.reply(option, P.NBD_REP_INFO, P.INFO_BLOCK_SIZE.pack(
            P.NBD_INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, MAX_PAYLOAD))
        if P.NBD_INFO_NAME in wanted:
            self.reply(option, P.NBD_REP_INFO,
                       P.INFO_TYPE.pack(P.NBD_INFO_NAME) + ex.name.encode())
        if P.NBD_INFO_DESCRIPTION in wanted and ex.description:
            self.reply(option, P.NBD_REP_INFO,
                       P.INFO_TYPE.pack(P.NBD_INFO_DESCRIPTION) + ex.description.encode())
        self.reply(option, P.NBD_REP_ACK)
        return True

    # -- everything else ---------------------------------------------------------------------

    def list(self, option, r):
        r.end()
        name = self.export.name.encode()
        description = (self.export.description or "").encode()      # (as qemu-nbd lists it)
        self.reply(option, P.NBD_REP_SERVER, P.U32.pack(len(name)) + name + description)
        self.reply(option, P.NBD_REP_ACK)

    def before_tls(self, option):
        """qemu-nbd's answers while TLS is required and not yet started:
        NBD_OPT_EXPORT_NAME (which cannot be refused) drops the
        connection; anything else gets NBD_REP_ERR_TLS_REQD, and
        NBD_OPT_ABORT then ends the session."""
        message = f"Option {option:#x} not permitted before TLS"
        if option == P.NBD_OPT_EXPORT_NAME:
            raise ProtocolError(message)
        self.error(option, P.NBD_REP_ERR_TLS_REQD, message)
        return False if option == P.NBD_OPT_ABORT else None

    def starttls(self, option, r):
        if r.data:      # qemu-nbd drops a client that cannot start TLS correctly
            self.error(option, P.NBD_REP_ERR_INVALID, "option 'starttls' has unexpected length")
            self.chan.flush()
            raise ProtocolError("NBD_OPT_STARTTLS with option data")
        if self.tls is None:
            return self.error(option, P.NBD_REP_ERR_POLICY, "TLS not configured")
        if self.session.tls:
            return self.error(option, P.NBD_REP_ERR_INVALID, "TLS already enabled")
        self.reply(option, P.NBD_REP_ACK)
        try:
            self.chan.starttls(self.tls, HANDSHAKE_TIMEOUT)
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        if self.tls_authz is not None and self.tls.verify_mode == ssl.CERT_REQUIRED:
            identity = peer_identity(self.chan.sock)
            if identity is None or not self.tls_authz.allows(identity):
                raise ProtocolError(f"TLS x509 authz check for {identity} is denied")
        self.session.tls = True

    def structured_reply(self, option, r):
        r.end()
        if self.session.structured:
            raise _Invalid("structured replies were already negotiated")
        self.session.structured = True
        self.reply(option, P.NBD_REP_ACK)

    def _meta_queries(self, r):
        if not self.session.structured:
            raise _Invalid("negotiate structured replies first")
        name = r.string()
        queries = [r.string() for _ in range(r.u32())]
        r.end()
        if not self.export.matches(name):
            return name, None
        return name, queries

    def list_meta_context(self, option, r):
        name, queries = self._meta_queries(r)
        if queries is None:
            return self.error(option, P.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
        for ctx in self.export.contexts.listed(queries):
            self._context_reply(option, ctx, 0)
        self.reply(option, P.NBD_REP_ACK)

    def set_meta_context(self, option, r):
        name, queries = self._meta_queries(r)
        if queries is None:
            return self.error(option, P.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
        self.session.contexts = self.export.contexts.selected(queries)
        for ctx, cid in self.session.contexts:
            self._context_reply(option, ctx, cid)
        self.reply(option, P.NBD_REP_ACK)

    def _context_reply(self, option, ctx, cid):
        self.reply(option, P.NBD_REP_META_CONTEXT, P.META_CONTEXT_ID.pack(cid) + ctx.encode())
