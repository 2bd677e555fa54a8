"""The NBD server under load and faults (``qcow2fast serve`` in its own
process): 64 clients at once; clients that disconnect mid-request, send
malformed or oversized requests, or never read their replies, while other
clients keep being served; the server's memory stays bounded; a write
acknowledged by a flush is in the image after the server is killed."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from qcow2fast.nbd import protocol as P
from tests.helpers.nbd_util import RawClient
from tests.helpers.qemu_util import REPO, qemu_check, qemu_create, qemu_io, qemu_raw

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SIZE = 64 * MiB


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


class ServeProcess:
    """``qcow2fast serve -t --socket S --shared N image`` in a child process."""

    def __init__(self, image, sock, shared=64):
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.sock = sock
        self.proc = subprocess.Popen([sys.executable, "-m", "qcow2fast", "serve", "-t",
                                      "--socket", sock, "--shared", str(shared), image],
                                     env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the server never listened"
            time.sleep(0.02)

    def client(self):
        c = RawClient(self.sock)
        c.go()
        return c

    def stop(self):
        """SIGTERM: a clean stop, which must not hang on stuck clients."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err.decode()

    def kill(self):
        self.proc.kill()
        self.proc.communicate(timeout=60)


@pytest.fixture
def image(tmp_path):
    path = qemu_create(tmp_path / "load.qcow2", SIZE)
    qemu_io(path, "write -P 0x5a 0 1M")
    return path


def pattern(i, n=65536):
    return bytes([(i * 7 + 1) & 0xff]) * n


def test_64_clients_at_once(image, tmp_path):
    srv = ServeProcess(image, str(tmp_path / "s.sock"), shared=64)
    clients = [srv.client() for _ in range(64)]       # all connected and negotiated
    errors, barrier = [], threading.Barrier(64)

    def work(i, c):
        try:
            barrier.wait()
            for k in range(4):
                off = (i * 4 + k) * 65536 + 2 * MiB
                assert c.write(off, pattern(i)).error == 0
            assert c.request(P.NBD_CMD_FLUSH).error == 0
            for k in range(4):
                off = (i * 4 + k) * 65536 + 2 * MiB
                assert c.read(off, 65536).data == pattern(i)
            assert c.read(0, 4096).data == b"\x5a" * 4096
            c.disconnect()
        except BaseException as e:          # noqa: B902 - reported below
            errors.append((i, e))
    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    srv.stop()
    qemu_check(image)
    data = qemu_raw(image)
    for i in range(64):
        off = i * 4 * 65536 + 2 * MiB
        assert data[off:off + 4 * 65536] == pattern(i) * 4, i


def raw_socket(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def test_faulty_clients_do_not_stop_the_others(image, tmp_path):
    srv = ServeProcess(image, str(tmp_path / "s.sock"), shared=32)
    good = [srv.client() for _ in range(4)]
    base = rss(srv.proc.pid)
    # Slow readers: 8 clients each ask for 64 MiB of reads and read nothing.
    slow = []
    for _ in range(8):
        c = srv.client()
        c.sock.setblocking(False)
        req = b"".join(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_READ, h, 0, MiB)
                       for h in range(64))
        try:
            c.sock.send(req)
        except BlockingIOError:
            pass
        slow.append(c)
    # Faults: mid-header, mid-payload, bad magic, oversized requests, garbage.
    for stream in (P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_READ, 1, 0, 4096)[:9],
                   P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_WRITE, 1, 0, MiB)
                   + b"\xee" * 1000,
                   P.REQUEST.pack(0xdeadbeef, 0, P.NBD_CMD_READ, 1, 0, 4096),
                   os.urandom(4096)):
        c = srv.client()
        c.sock.sendall(stream)
        c.close()
    for length in ((1 << 32) - 1, 1 << 30):
        c = srv.client()
        assert c.read(0, length).error == P.NBD_EINVAL     # larger than the maximum
        c.sock.sendall(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_WRITE, 9, 0, length))
        c.close()                           # the payload never comes
    s = raw_socket(srv.sock)                 # a client that never finishes the handshake
    # The others are served throughout.
    for i, c in enumerate(good):
        assert c.write(4 * MiB + i * 65536, pattern(i)).error == 0
        assert c.request(P.NBD_CMD_FLUSH).error == 0
        assert c.read(4 * MiB + i * 65536, 65536).data == pattern(i)
    # Memory: the stuck replies are bounded per connection (one 1 MiB read
    # in flight each, plus buffers), not 8 x 64 MiB.
    grown = rss(srv.proc.pid) - base
    assert grown < 8 * 24 * MiB, f"server grew by {grown >> 20} MiB"
    for c in good:
        c.disconnect()
    srv.stop()                              # with the slow readers still connected
    s.close()
    for c in slow:
        c.close()
    qemu_check(image)
    data = qemu_raw(image)
    assert data[:MiB] == b"\x5a" * MiB      # nothing from the broken writes
    for i in range(4):
        assert data[4 * MiB + i * 65536:][:65536] == pattern(i)


def test_flushed_write_survives_a_killed_server(image, tmp_path):
    srv = ServeProcess(image, str(tmp_path / "s.sock"))
    c = srv.client()
    assert c.write(8 * MiB, b"\x77" * 200000).error == 0
    assert c.write(40 * MiB, b"\x78" * 4096).error == 0
    assert c.request(P.NBD_CMD_FLUSH).error == 0
    srv.kill()                              # SIGKILL: no close, no final flush
    res = qemu_check(image, expect_clean=False)     # leaks are allowed, corruption is not
    assert res["exit_code"] in (0, 3) and not res.get("corruptions"), res
    p = qemu_io(image, "read -P 0x77 8M 200000", "read -P 0x78 40M 4k", extra=["-r"])
    assert p.returncode == 0
