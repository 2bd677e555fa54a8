"""What a server exports, as ``qemu-nbd -L`` lists it (qemu's
nbd_receive_export_list and qemu-nbd.c's qemu_nbd_client_list): the names
and descriptions of NBD_OPT_LIST, then for each export the NBD_OPT_INFO
answers (size, flags, block sizes) and, with structured replies, the
metadata contexts NBD_OPT_LIST_META_CONTEXT lists for no query."""

from dataclasses import dataclass, field

from ..host.sockets import connect
from . import protocol as P
from .channel import Channel
from .client import Negotiation, NbdError, _string32

# Transmission flag bits -> the names qemu-nbd -L prints (in bit order).
FLAG_NAMES = {P.NBD_FLAG_READ_ONLY: "readonly", P.NBD_FLAG_SEND_FLUSH: "flush",
              P.NBD_FLAG_SEND_FUA: "fua", P.NBD_FLAG_ROTATIONAL: "rotational",
              P.NBD_FLAG_SEND_TRIM: "trim", P.NBD_FLAG_SEND_WRITE_ZEROES: "zeroes",
              P.NBD_FLAG_SEND_DF: "df", P.NBD_FLAG_CAN_MULTI_CONN: "multi",
              P.NBD_FLAG_SEND_RESIZE: "resize", P.NBD_FLAG_SEND_CACHE: "cache",
              P.NBD_FLAG_SEND_FAST_ZERO: "fast-zero"}


@dataclass
class ExportInfo:
    """One export as the server describes it (0: not told)."""
    name: str
    description: str = ""
    size: int = 0
    flags: int = 0
    min_block: int = 0
    opt_block: int = 0
    max_block: int = 0
    contexts: list = field(default_factory=list)

    def lines(self):
        """qemu-nbd -L's lines for this export."""
        out = [f" export: '{self.name}'"]
        if self.description:
            out.append(f"  description: {self.description}")
        if self.flags & P.NBD_FLAG_HAS_FLAGS:
            names = "".join(f" {n}" for bit, n in FLAG_NAMES.items() if self.flags & bit)
            out += [f"  size:  {self.size}", f"  flags: {self.flags:#x} ({names} )"]
        if self.min_block:
            out += [f"  min block: {self.min_block}", f"  opt block: {self.opt_block}",
                    f"  max block: {self.max_block}"]
        if self.contexts:
            out.append(f"  available meta contexts: {len(self.contexts)}")
            out += [f"   {c}" for c in self.contexts]
        return out


class _Lister(Negotiation):
    def __init__(self, address, timeout):
        self._sock = connect(address, timeout, NbdError)
        self._chan = Channel(self._sock)

    def exports(self, tls, hostname):
        structured = self._greet(tls, hostname)
        listed = self._option(P.NBD_OPT_LIST, b"")
        if listed is None:
            if self.refused[0] != P.NBD_REP_ERR_UNSUP:
                raise self.refusal(P.NBD_OPT_LIST)
            listed = []                 # (as qemu's client: none listed)
        exports = []
        for rtype, data in listed:
            if rtype != P.NBD_REP_SERVER or len(data) < 4 or \
                    P.U32.unpack_from(data)[0] > len(data) - 4:
                self._fail("NBD_REP_SERVER", f"a reply of type {rtype} and {len(data)} bytes")
            n = P.U32.unpack_from(data)[0]
            exports.append(ExportInfo(data[4:4 + n].decode(errors="replace"),
                                      data[4 + n:].decode(errors="replace")))
        for export in exports:
            if not self._info(export):
                break               # (as qemu: without INFO, contexts will not work either)
            if structured:
                export.contexts = self._contexts(export.name)
        self._sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_ABORT, 0))
        return exports

    def _info(self, export):
        """NBD_OPT_INFO asking for the block sizes; False if refused."""
        replies = self._option(P.NBD_OPT_INFO, _string32(export.name) + P.U16.pack(1)
                               + P.U16.pack(P.NBD_INFO_BLOCK_SIZE))
        if replies is None:
            return False
        for rtype, data in replies:
            kind = P.INFO_TYPE.unpack_from(data)[0] if len(data) >= 2 else None
            if rtype != P.NBD_REP_INFO:
                continue
            if kind == P.NBD_INFO_EXPORT and len(data) == P.INFO_EXPORT.size:
                _, export.size, export.flags = P.INFO_EXPORT.unpack(data)
            elif kind == P.NBD_INFO_BLOCK_SIZE and len(data) == P.INFO_BLOCK_SIZE.size:
                _, export.min_block, export.opt_block, export.max_block = \
                    P.INFO_BLOCK_SIZE.unpack(data)
        if not export.flags & P.NBD_FLAG_HAS_FLAGS:
            self._fail("NBD_INFO_EXPORT", f"export {export.name!r} without its flags")
        return True

    def _contexts(self, name):
        """Every context for no query; then, as qemu's client does (a
        workaround for qemu 3.0 servers that left them out), those of the
        query ``qemu:`` if none of them was qemu's."""
        found = self._list_contexts(name, [])
        if found and not any(c.startswith("qemu:") for c in found):
            found += self._list_contexts(name, ["qemu:"])
        return found

    def _list_contexts(self, name, queries):
        data = _string32(name) + P.U32.pack(len(queries)) + b"".join(map(_string32, queries))
        replies = self._option(P.NBD_OPT_LIST_META_CONTEXT, data) or ()
        return [d[4:].decode(errors="replace") for t, d in replies
                if t == P.NBD_REP_META_CONTEXT and len(d) >= 4]

    def close(self):
        self._sock.close()


def list_exports(address, timeout=30.0, tls=None, hostname=None):
    """The exports of the server at ``address`` ((host, port) or a Unix
    socket's path), as :class:`ExportInfo`; NbdError if it cannot be
    asked.  ``tls``: a client SSLContext (the server's certificate checked
    against ``hostname``)."""
    lister = _Lister(address, timeout)
    try:
        return lister.exports(tls, hostname)
    finally:
        lister.close()
