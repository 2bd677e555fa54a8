"""``qcow2fast serve`` where tools start qemu-nbd: its options, messages,
json: file names, --fork/--pid-file, and the meta-context answers, each
checked against qemu-nbd 7.2 run side by side."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from qcow2fast.nbd import protocol as P

from tests.helpers.cli_util import run_cli
from tests.helpers.nbd_util import (QEMU_NBD, RawClient, nbdcopy, nbdinfo, side_by_side,
                                    start_cli, stop_server, unix_uri)
from tests.helpers.qemu_util import (REPO, MiB, qemu_check, qemu_create, qemu_img, qemu_io,
                                     qemu_map, run)

pytestmark = pytest.mark.qemu

SIZE = 8 * MiB


@pytest.fixture
def chain(tmp_path, qemu):
    base = qemu_create(tmp_path / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x11 0 2M")
    top = qemu_create(tmp_path / "top.qcow2", None, backing=base)
    qemu_img("bitmap", "--add", top, "b0")
    qemu_img("bitmap", "--add", "-g", "128k", top, "b1")
    qemu_io(top, "write -P 0x22 1M 512k", "write -z 4M 64k")
    return top


def test_version_first_line_reads_as_qemu_nbds(capsys):
    # qemu-nbd prints its argv[0]: run by name, as tools do
    theirs = run(["qemu-nbd" if QEMU_NBD else "", "--version"]).stdout_text.splitlines()[0]
    status, out, _ = run_cli(capsys, "serve", "--version")
    ours = out.splitlines()[0]
    pattern = r"qemu-nbd (\d+)\.(\d+)\.(\d+)(?: \(.*\))?"
    assert status == 0 and re.fullmatch(pattern, ours), ours
    assert re.fullmatch(pattern, theirs).groups()[:2] == re.fullmatch(pattern, ours).groups()[:2]


BAD = [["-e", "3x"], ["-e", "-1"], ["--cache=x"], ["--aio=x"], ["--aio=native"],
       ["--discard=x"], ["--detect-zeroes=bad"], ["--detect-zeroes=unmap"],
       ["-n", "--cache=directsync"], ["--tls-creds", "tls0"], ["--object", "foo,id=x"],
       ["--object", "tls-creds-x509,id=tls0,dir=/nonexistent,endpoint=server",
        "--tls-creds", "tls0"],
       ["--pid-file", "/nonexistent/pid"], ["-r", "-B", "nope"],
       ['json:{"driver":"foo","file":{"driver":"file","filename":"IMG"}}'],
       ['json:{"driver":"raw","offset":4000000,"size":8388608,'
        '"file":{"driver":"file","filename":"IMG"}}'],
       ['json:{"driver":"raw","size":1000,"file":{"driver":"file","filename":"IMG"}}'],
       ['json:{"driver":"qcow2","file":{"driver":"file","filename":"IMG"},"bogus":1}']]


@pytest.mark.parametrize("args", BAD, ids=lambda a: " ".join(a)[:40])
def test_bad_options_fail_with_qemu_nbds_message(args, tmp_path, capsys, qemu):
    image = qemu_create(tmp_path / "x.qcow2", SIZE)
    raw = tmp_path / "x.raw"
    raw.write_bytes(bytes(4 << 20))
    args = [a.replace("IMG", str(raw if "raw" in a else image)) for a in args]
    file_args = [] if args[-1].startswith("json:") else [image]
    sock = tmp_path / "s"
    theirs = run([QEMU_NBD, "-k", sock, *args, *file_args], check=False, timeout=60)
    status, _, err = run_cli(capsys, "serve", "-k", sock, *args, *file_args)
    assert theirs.returncode == status == 1
    message = theirs.stderr_text.splitlines()[0].removeprefix("qemu-nbd: ")
    assert err.strip() == f"qcow2fast: {message}"


def test_json_qcow2_alone_and_raw_window(chain, tmp_path):
    one = 'json:{"driver":"qcow2","file":{"driver":"file","filename":"%s"},"backing":null}' \
        % chain
    maps = side_by_side(tmp_path, ["-r", "-A"], one,
                 lambda uri, _: nbdinfo("--map=qemu:allocation-depth", uri).stdout_text)
    assert maps[0] == maps[1] and "absent" in maps[0]
    window = ('json:{"driver":"raw","offset":1048576,"size":2097152,'
              '"file":{"driver":"qcow2","file":{"driver":"file","filename":"%s"}}}' % chain)
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", window, expected)
    copies = side_by_side(tmp_path, ["-r"], window,
                   lambda uri, _: (nbdcopy(uri, str(tmp_path / "c.raw")),
                                   (tmp_path / "c.raw").read_bytes())[1])
    assert copies[0] == copies[1] == expected.read_bytes()
    assert len(copies[1]) == 2 * MiB


def test_discard_and_detect_zeroes_as_qemu_nbd(chain, tmp_path):
    ops = ["write -P 0 0 64k", "discard 1M 128k", "write -z 2M 64k", "write -P 0 3M 64k"]
    for args in ([], ["--discard=unmap"], ["--detect-zeroes=on"],
                 ["--discard=unmap", "--detect-zeroes=unmap"]):
        side_by_side(tmp_path, ["-t", "-f", "qcow2", *args], chain,
                     lambda uri, _: qemu_io(uri, *ops, fmt="raw"), copy=True)
        theirs, ours = (qemu_map(tmp_path / f"{n}-top.qcow2") for n in ("qemu", "ours"))
        assert ours == theirs, args
        qemu_check(tmp_path / f"ours-{os.path.basename(chain)}")


def test_fork_pid_file_shared_and_multi_conn(chain, tmp_path):
    sock, pid_file = str(tmp_path / "f.sock"), tmp_path / "serve.pid"
    cmd = [sys.executable, "-m", "qcow2fast", "serve", "--fork", "--pid-file", pid_file,
           "-t", "-e", "2", "-r", "-k", sock, chain]
    # The parent exits once the child listens, and the child keeps none of
    # the caller's pipes (reading them to their end does not wait for it).
    p = subprocess.run([str(a) for a in cmd], env=dict(os.environ, PYTHONPATH=REPO),
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    pid = int(pid_file.read_text())
    try:
        assert os.path.exists(sock)                     # listening before the parent exits
        for _ in range(2):                              # persistent
            info = json.loads(nbdinfo("--json", unix_uri(sock)).stdout_text)
            assert info["exports"][0]["can_multi_conn"] is True
    finally:
        os.kill(pid, signal.SIGTERM)
    for _ in range(600):
        if not os.path.exists(sock):
            break
        time.sleep(0.1)
    assert not os.path.exists(sock)
    # A server that cannot start: the parent reports the child's failure.
    p = subprocess.run([sys.executable, "-m", "qcow2fast", "serve", "--fork", "-k", sock,
                        "-B", "nope", str(chain)], env=dict(os.environ, PYTHONPATH=REPO),
                       capture_output=True, timeout=120)
    assert p.returncode == 1 and b"Bitmap 'nope' is not found" in p.stderr


@pytest.mark.parametrize("shared", ["1", "2", "0"])
def test_multi_conn_follows_shared_as_qemu_nbd(chain, tmp_path, shared):
    flags = side_by_side(tmp_path, ["-r", "-e", shared], chain, lambda uri, _: json.loads(
        nbdinfo("--json", uri).stdout_text)["exports"][0]["can_multi_conn"])
    assert flags[0] == flags[1]


QUERIES = [[], ["qemu:"], ["base:"], ["qemu:allocation-depth"], ["qemu:dirty-bitmap:"],
           ["qemu:dirty-bitmap:b0"], ["qemu:dirty-bitmap:zz"], ["qemu:dirty-bitmap"],
           ["qemu:dirty-bitmap:b1", "base:allocation", "qemu:dirty-bitmap:b0"],
           ["base:allocation", "qemu:allocation-depth"], ["foo:"], ["qemu"], ["qemu:x"],
           ["qemu:allocation-depth", "base:allocation", "base:allocation"]]


def meta_answers(uri, _):
    """(LIST, SET) replies to each of QUERIES: reply types, names, ids."""
    path = uri.split("socket=")[1]
    out = []
    for queries in QUERIES:
        c = RawClient(path)
        c.option(P.NBD_OPT_STRUCTURED_REPLY)
        for option in (P.NBD_OPT_LIST_META_CONTEXT, P.NBD_OPT_SET_META_CONTEXT):
            out.append([(t, d) for t, d in c.option(option, c.meta_data("", queries))])
        c.option(P.NBD_OPT_ABORT)
        c.close()
    return out


@pytest.mark.parametrize("args", [["-A"], [], ["-B", "b1"], ["-A", "-B", "b0", "-B", "b1"]])
def test_meta_context_answers_as_qemu_nbd(chain, tmp_path, args):
    theirs, ours = side_by_side(tmp_path, ["-r", "-t", *args], chain, meta_answers)
    assert ours == theirs


def test_offset_exports_the_rest_of_the_image(chain, tmp_path):
    expected = tmp_path / "all.raw"
    qemu_img("convert", "-O", "raw", chain, expected)
    data = expected.read_bytes()

    def copy(uri, _):
        nbdcopy(uri, str(tmp_path / "o.raw"))
        return (tmp_path / "o.raw").read_bytes()
    theirs, ours = side_by_side(tmp_path, ["-r", "-o", str(MiB)], chain, copy)
    assert ours == theirs == data[MiB:]
    # Unaligned: the size rounded up to a sector as qemu-nbd's, zeros past the end.
    # (qemu-nbd 7.2 hangs reading such an export, so only its size is compared.)
    sizes = side_by_side(tmp_path, ["-r", "-o", "1000"], chain,
                         lambda uri, _: int(nbdinfo("--size", uri).stdout_text))
    assert sizes[0] == sizes[1] == SIZE - 512
    sock = str(tmp_path / "u.sock")
    p = start_cli(["-r", "-k", sock, "-o", "1000", chain], sock)
    try:
        assert copy(unix_uri(sock), None) == data[1000:] + bytes(sizes[1] - (SIZE - 1000))
    finally:
        stop_server(p)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_bind_port_export_name_as_qemu_nbd(chain, tmp_path):
    """What backup tools pass over TCP: ``--fork --pid-file -t -b ADDR -p
    PORT -x NAME -r -B NAME --cache --aio -f``; the bitmap map and the export's
    description over ``nbd://ADDR:PORT/NAME`` are qemu-nbd's."""
    outs = []
    for name, cmd in (("qemu", [QEMU_NBD]), ("ours", [sys.executable, "-m", "qcow2fast",
                                                      "serve"])):
        port, pid_file = _free_port(), tmp_path / f"{name}.pid"
        p = subprocess.run([str(a) for a in (
            *cmd, "--fork", "--pid-file", pid_file, "-t", "-b", "127.0.0.1", "-p", port,
            "-x", "exp", "-r", "-B", "b0", "--cache=writeback", "--aio=threads", "-f", "qcow2",
            chain)], env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr
        pid = int(pid_file.read_text())
        try:
            uri = f"nbd://127.0.0.1:{port}/exp"
            info = json.loads(nbdinfo("--json", uri).stdout_text)["exports"][0]
            outs.append((nbdinfo("--map=qemu:dirty-bitmap:b0", uri).stdout_text,
                         info["export-name"], info["export-size"], info["is_read_only"]))
        finally:
            os.kill(pid, signal.SIGTERM)
    assert outs[1] == outs[0]
    assert outs[0][1:] == ("exp", SIZE, True) and "dirty" in outs[0][0]
