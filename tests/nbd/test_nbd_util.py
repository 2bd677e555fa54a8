"""The server-start helper waits for a listening socket, not for the socket
file (bind() creates it before listen()), and never leaves a server running
when its start fails."""

import os
import socket
import sys

import pytest

from tests.helpers.nbd_util import is_listening, start_server, stop_server

# Binds, waits DELAY s with the socket file present but not listening, then listens.
CHILD = """import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])
time.sleep(float(sys.argv[2]))
if float(sys.argv[2]) < 100: s.listen(); time.sleep(100)
"""


def test_waits_for_listen_not_for_the_socket_file(tmp_path):
    sock = str(tmp_path / "s.sock")
    p = start_server([sys.executable, "-c", CHILD, sock, "1.0"], sock)
    try:
        assert is_listening(sock)
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(sock)                     # refused if returned at bind()
    finally:
        stop_server(p)


def test_a_server_that_never_listens_is_killed(tmp_path):
    sock = str(tmp_path / "s.sock")
    pids = []
    real_popen = __import__("subprocess").Popen

    class Recording(real_popen):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            pids.append(self)
    mp = pytest.MonkeyPatch()
    mp.setattr("subprocess.Popen", Recording)
    try:
        with pytest.raises(pytest.fail.Exception, match="not listening.*killed after 1 s"):
            start_server([sys.executable, "-c", CHILD, sock, "1000"], sock, timeout=1)
    finally:
        mp.undo()
    assert os.path.exists(sock) and not is_listening(sock)
    assert pids and pids[0].returncode is not None     # reaped: not left running


def test_a_server_that_exits_fails_with_its_stderr(tmp_path):
    sock = str(tmp_path / "s.sock")
    with pytest.raises(pytest.fail.Exception, match="exit 3.*boom"):
        start_server([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"],
                     sock)
