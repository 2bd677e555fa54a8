"""Helpers for the NBD server tests: the libnbd tools (nbdinfo, nbdcopy),
a server on a Unix socket or on TCP, and a hand-written raw client that
speaks the protocol byte by byte (using the server's own message layouts
from ``qcow2fast.nbd.protocol``, so a layout error shows up as a client
that cannot talk to qemu-img, not as two matching mistakes)."""

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

import qcow2fast.nbd
from qcow2fast.nbd import protocol as P

from .qemu_util import IN_CI, REPO, run

NBDINFO = shutil.which("nbdinfo")
NBDCOPY = shutil.which("nbdcopy")


def require_libnbd():
    """Skip (or, under CI=true, fail) when nbdinfo/nbdcopy are missing."""
    if NBDINFO and NBDCOPY:
        return
    msg = "nbdinfo/nbdcopy not installed (Debian package libnbd-bin)"
    if IN_CI:
        pytest.fail(msg + " -- required when CI=true", pytrace=False)
    pytest.skip(msg)


def unix_uri(path, export=""):
    return f"nbd+unix:///{export}?socket={path}"


@contextlib.contextmanager
def served(image, tmp_path, *, tcp=False, **options):
    """A running server for ``image`` (path or open image); yields
    (server, uri).  The server is closed on exit."""
    if tcp:
        server = qcow2fast.nbd.serve(image, host="127.0.0.1", port=0, **options)
        host, port = server.address[:2]
        uri = f"nbd://{host}:{port}/{options.get('export_name', '')}"
    else:
        sock = str(tmp_path / "nbd.sock")
        server = qcow2fast.nbd.serve(image, socket_path=sock, **options)
        uri = unix_uri(sock, options.get("export_name", ""))
    try:
        yield server, uri
    finally:
        server.close()


QEMU_NBD = shutil.which("qemu-nbd")


def start_cli(args, sock):
    """``qcow2fast serve ARGS`` in a subprocess, once ``sock`` exists."""
    return start_server([sys.executable, "-m", "qcow2fast", "serve", *args], sock)


def start_qemu_nbd(args, sock):
    """``qemu-nbd ARGS`` (the oracle) in a subprocess, once ``sock`` exists."""
    if not QEMU_NBD:
        pytest.fail("qemu-nbd not installed (Debian package qemu-utils)", pytrace=False)
    return start_server([QEMU_NBD, *args], sock)


def stop_server(p):
    """SIGTERM, and the server's exit status; a server still running a minute
    later is killed and the test fails (never left behind)."""
    if p.poll() is None:
        p.terminate()
    try:
        return p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail(f"server pid {p.pid} ignored SIGTERM for 60 s (killed)", pytrace=False)


def side_by_side(tmp_path, args, image, fn, *, copy=False):
    """fn(uri, image) with qemu-nbd ARGS serving, then with serve ARGS; the
    two results.  With ``copy``, each server gets its own copy of image."""
    out = []
    for name, start in (("qemu", start_qemu_nbd), ("ours", start_cli)):
        path = image
        if copy:
            path = tmp_path / f"{name}-{os.path.basename(image)}"
            path.write_bytes(open(image, "rb").read())
        sock = str(tmp_path / f"{name}.sock")
        p = start(["-k", sock, *args, path], sock)
        try:
            out.append(fn(unix_uri(sock), path))
        finally:
            stop_server(p)
    return out


_SO_ACCEPTCON = 0x10000                         # /proc/net/unix Flags of a listening socket


def is_listening(sock):
    """True when a Unix socket bound to ``sock`` is listening.  The socket
    file exists from bind(), before listen(): checked in /proc/net/unix, not
    by connecting (a qemu-nbd without -t would serve that one connection and exit)."""
    path = os.path.realpath(sock)
    with open("/proc/net/unix") as f:
        next(f)                                 # header
        for line in f:
            fields = line.split(None, 7)
            if len(fields) == 8 and int(fields[3], 16) & _SO_ACCEPTCON \
                    and os.path.realpath(fields[7].rstrip("\n")) == path:
                return True
    return False


def start_server(cmd, sock, timeout=60):
    """The server process once it listens on ``sock`` (or, with --fork, once
    its parent has exited and the socket listens).  A server that does not
    listen within ``timeout`` s is killed (never left running) and the start fails."""
    p = subprocess.Popen([str(a) for a in cmd], env=dict(os.environ, PYTHONPATH=REPO),
                         stderr=subprocess.PIPE)
    for _ in range(int(timeout * 10)):
        if is_listening(sock) or p.poll() is not None:
            break
        time.sleep(0.1)
    if is_listening(sock):
        return p
    running = p.poll() is None
    if running:
        p.kill()
    err = p.communicate(timeout=60)[1].decode()
    pytest.fail(f"{cmd[0]} not listening on {sock} "
                f"({f'killed after {timeout} s' if running else f'exit {p.returncode}'}): {err}",
                pytrace=False)


def nbdinfo(*args, check=True):
    require_libnbd()
    return run([NBDINFO, *args], check=check, timeout=120)


def nbdcopy(*args):
    require_libnbd()
    return run([NBDCOPY, *args], timeout=120)


class Reply:
    """One reply: error value, data (READ), and the chunks of a structured reply."""

    def __init__(self, error=0, data=b"", chunks=(), message=""):
        self.error, self.data, self.chunks, self.message = error, data, list(chunks), message


class RawClient:
    """A minimal NBD client over a connected socket."""

    def __init__(self, address, *, handshake=True):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(address)
        self.handle = 0
        self.structured = False
        if handshake:
            self.greet()

    def close(self):
        self.sock.close()

    def recv_exact(self, n):
        out = bytearray()
        while len(out) < n:
            got = self.sock.recv(n - len(out))
            if not got:
                raise EOFError(f"server closed the connection ({len(out)} of {n} bytes)")
            out += got
        return bytes(out)

    def at_eof(self):
        """True when the server has closed the connection."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # -- handshake -----------------------------------------------------------------------

    def greet(self, client_flags=P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES):
        magic, opt_magic, self.hflags = P.SERVER_GREETING.unpack(
            self.recv_exact(P.SERVER_GREETING.size))
        assert (magic, opt_magic) == (P.NBDMAGIC, P.IHAVEOPT)
        self.sock.sendall(P.CLIENT_FLAGS.pack(client_flags))

    def option(self, option, data=b""):
        """Send an option; returns its replies [(type, data)] up to the final one."""
        self.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, rtype, n = P.OPTION_REPLY.unpack(self.recv_exact(P.OPTION_REPLY.size))
            assert magic == P.NBD_OPT_REPLY_MAGIC and opt == option
            replies.append((rtype, self.recv_exact(n)))
            if rtype == P.NBD_REP_ACK or rtype & P.NBD_REP_FLAG_ERROR:
                return replies

    @staticmethod
    def go_data(name="", infos=()):
        n = name.encode()
        return (P.U32.pack(len(n)) + n + P.U16.pack(len(infos))
                + b"".join(P.U16.pack(i) for i in infos))

    @staticmethod
    def meta_data(name, queries):
        n = name.encode()
        out = P.U32.pack(len(n)) + n + P.U32.pack(len(queries))
        for q in queries:
            out += P.U32.pack(len(q)) + q.encode()
        return out

    def go(self, name="", *, structured=True, contexts=()):
        """Negotiate and enter transmission; returns (size, transmission flags)."""
        if structured:
            assert self.option(P.NBD_OPT_STRUCTURED_REPLY) == [(P.NBD_REP_ACK, b"")]
            self.structured = True
        if contexts:
            replies = self.option(P.NBD_OPT_SET_META_CONTEXT, self.meta_data(name, contexts))
            self.context_ids = {d[4:].decode(): P.U32.unpack(d[:4])[0]
                                for t, d in replies if t == P.NBD_REP_META_CONTEXT}
        replies = self.option(P.NBD_OPT_GO, self.go_data(name))
        assert replies[-1][0] == P.NBD_REP_ACK, replies
        for rtype, data in replies:
            if rtype == P.NBD_REP_INFO and P.U16.unpack(data[:2])[0] == P.NBD_INFO_EXPORT:
                _, self.size, self.tflags = P.INFO_EXPORT.unpack(data)
        return self.size, self.tflags

    # -- transmission ---------------------------------------------------------------------------

    def send_request(self, cmd, offset=0, length=0, flags=0, payload=b""):
        self.handle += 1
        self.sock.sendall(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, flags, cmd, self.handle,
                                         offset, length) + payload)
        return self.handle

    def request(self, cmd, offset=0, length=0, flags=0, payload=b""):
        handle = self.send_request(cmd, offset, length, flags, payload)
        return self.reply(handle, length if cmd == P.NBD_CMD_READ else 0)

    def reply(self, handle, read_length=0):
        if not self.structured:
            magic, error, h = P.SIMPLE_REPLY.unpack(self.recv_exact(P.SIMPLE_REPLY.size))
            assert magic == P.NBD_SIMPLE_REPLY_MAGIC and h == handle
            data = self.recv_exact(read_length) if read_length and not error else b""
            return Reply(error, data)
        reply = Reply()
        pieces = []         # (offset, bytes) of the read's data and hole chunks
        while True:
            magic, flags, rtype, h, n = P.STRUCTURED_REPLY.unpack(
                self.recv_exact(P.STRUCTURED_REPLY.size))
            assert magic == P.NBD_STRUCTURED_REPLY_MAGIC and h == handle
            payload = self.recv_exact(n)
            reply.chunks.append((rtype, payload))
            if rtype == P.NBD_REPLY_TYPE_OFFSET_DATA:
                pieces.append((struct.unpack(">Q", payload[:8])[0], payload[8:]))
            elif rtype == P.NBD_REPLY_TYPE_OFFSET_HOLE:
                off, hole = struct.unpack(">QI", payload)
                pieces.append((off, bytes(hole)))
            elif rtype & (1 << 15):
                reply.error, mlen = P.ERROR_PAYLOAD.unpack(payload[:6])
                reply.message = payload[6:6 + mlen].decode()
            if flags & P.NBD_REPLY_FLAG_DONE:
                pieces.sort(key=lambda p: p[0])
                if pieces:      # the chunks tile the request, with no gap or overlap
                    assert all(a[0] + len(a[1]) == b[0] for a, b in zip(pieces, pieces[1:]))
                reply.data = b"".join(d for _, d in pieces)
                return reply

    def read(self, offset, length, flags=0):
        return self.request(P.NBD_CMD_READ, offset, length, flags)

    def write(self, offset, data, flags=0):
        return self.request(P.NBD_CMD_WRITE, offset, len(data), flags, data)

    def disconnect(self):
        self.send_request(P.NBD_CMD_DISC)
        self.close()
