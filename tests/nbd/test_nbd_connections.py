"""What a connection costs to set up and to wait: buffers and worker
threads reused from ended connections, and polling for input given up
while it keeps failing (nbd/channel.py, nbd/server.py)."""

import socket
import threading
import time

import pytest

import qcow2fast
from qcow2fast._ext import nbdio
from qcow2fast.nbd import channel as C
from qcow2fast.nbd.channel import Channel
from qcow2fast.nbd.client import NbdClient

from tests.helpers.nbd_util import served

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.qcow2"
    qcow2fast.create(path, 8 * MiB)
    return path


def test_buffers_of_an_ended_connection_are_reused():
    a, b = socket.socketpair()
    C._spare.clear()
    try:
        first = Channel(a)
        buffers = first._rbuf, first._obuf
        first.release()
        second = Channel(b)
        assert second._rbuf is buffers[0] and second._obuf is buffers[1]
        # A buffer still exported (a view kept somewhere) is not handed out again.
        view = second._rmv[0:4]
        second.release()
        third = Channel(a)
        assert third._rbuf is not buffers[0]
        view.release()
    finally:
        a.close()
        b.close()


def test_sequential_connections_share_one_worker_and_close_stops_it(image, tmp_path):
    with qcow2fast.open(image, "r+") as img:
        with served(img, tmp_path, persistent=True) as (server, uri):
            for i in range(5):
                c = NbdClient(uri)
                c.pwrite(bytes([i + 1]) * 4096, i * 4096)
                assert c.pread(0, (i + 1) * 4096) == b"".join(bytes([k + 1]) * 4096
                                                              for k in range(i + 1))
                c.close()
                for _ in range(200):                # the worker goes idle after the close
                    if server._idle == 1:
                        break
                    time.sleep(0.01)
                assert len(server._workers) == 1 and server._idle == 1
            worker = next(iter(server._workers))
            started = time.monotonic()
        assert time.monotonic() - started < 5       # the idle worker stopped at once
        assert not worker.is_alive()


def test_failed_polls_back_off_and_a_success_resets():
    a, b = socket.socketpair()
    try:
        chan = Channel(a)
        chan._polling = nbdio.Polling()
        buf = memoryview(bytearray(16))

        def send_later():
            time.sleep(0.05)                        # well past POLL_NS
            b.send(b"x")
        for expected in (nbdio.POLL_REST_MIN, 2 * nbdio.POLL_REST_MIN):
            t = threading.Thread(target=send_later)
            t.start()
            assert chan._recv_polled(buf) == 1      # the poll failed, then it slept
            t.join()
            assert chan._polling.rest == expected   # these waits sleep at once
            for left in range(expected - 1, -1, -1):
                b.send(b"y")
                assert chan._recv_polled(buf) == 1
                assert chan._polling.rest == left
        assert chan._polling.backoff == 4 * nbdio.POLL_REST_MIN
        b.send(b"z")                                # polling again: it succeeds at once
        assert chan._recv_polled(buf) == 1
        assert chan._polling.backoff == nbdio.POLL_REST_MIN and chan._polling.rest == 0
        chan.release()                              # the next connection starts from it
        assert (C._last_polling.rest, C._last_polling.backoff) == (0, nbdio.POLL_REST_MIN)
    finally:
        a.close()
        b.close()
