"""The NBD server with real clients on loopback: qemu-img, qemu-io, nbdinfo
and nbdcopy, over Unix sockets and TCP, several at once, through socket
activation, and from asyncio.  Whatever a client wrote is checked
afterwards by opening the image with qemu-img."""

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest

import qcow2fast
import qcow2fast.nbd
from qcow2fast.host.raw import RawImage

from tests.helpers.nbd_util import (NBDCOPY, NBDINFO, nbdcopy, nbdinfo, require_libnbd, served,
                                    start_cli, unix_uri)
from tests.helpers.qemu_util import (QEMU_IO, REPO, MiB, qemu_check, qemu_compare, qemu_create,
                                     qemu_img, qemu_io, qemu_map, qemu_raw)

pytestmark = pytest.mark.qemu

SIZE = 8 * MiB


@pytest.fixture
def chain(tmp_path, qemu):
    """top.qcow2 over base.qcow2: data in both layers, zero clusters, a
    discarded range and unallocated space."""
    base = qemu_create(tmp_path / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x11 0 3M", "write -P 0x12 6M 1M")
    top = qemu_create(tmp_path / "top.qcow2", None, backing=base)
    qemu_io(top, "write -P 0x21 1M 512k", "write -z 2M 256k", "discard 6M 128k",
            "write -P 0x22 7M 64k", "write -P 0x23 7340000 1000")
    return top


def runs(entries):
    """Merge [(start, length, value)] into contiguous runs of equal value."""
    out = []
    for start, length, value in sorted(entries):
        if out and out[-1][1] == start and out[-1][2] == value:
            out[-1][1] += length
        else:
            out.append([start, start + length, value])
    return [tuple(r) for r in out]


def image_allocation(path):
    """(data, zero) runs and allocation-depth runs from qemu-img map of the image."""
    m = qemu_map(path)
    alloc = runs([(e["start"], e["length"], (e["data"], e["zero"])) for e in m])
    depth = runs([(e["start"], e["length"], e["depth"] + 1 if e["present"] else 0)
                  for e in m])
    return alloc, depth


def test_qemu_img_info_map_compare_convert(chain, tmp_path):
    expected = qemu_raw(chain)
    alloc, _ = image_allocation(chain)
    with served(chain, tmp_path, read_only=True) as (server, uri):
        info = json.loads(qemu_img("info", "--output=json", uri).stdout_text)
        assert info["virtual-size"] == SIZE
        m = json.loads(qemu_img("map", "--output=json", "-f", "raw", uri).stdout_text)
        assert runs([(e["start"], e["length"], (e["data"], e["zero"])) for e in m]) == alloc
        assert "identical" in qemu_img("compare", "-f", "raw", "-F", "qcow2", uri,
                                       chain).stdout_text
        out = str(tmp_path / "copy.qcow2")
        qemu_img("convert", "-f", "raw", "-O", "qcow2", uri, out)
    qemu_compare(out, expected)
    qemu_check(chain)


def test_nbdinfo_map_matches_the_image(chain, tmp_path):
    alloc, depth = image_allocation(chain)
    with served(chain, tmp_path) as (server, uri):
        base = json.loads(nbdinfo("--json", "--map", uri).stdout_text)
        got = runs([(e["offset"], e["length"], e["type"]) for e in base])
        flags = {(True, False): 0, (False, True): 3}     # data / hole+zero
        assert got == [(a, b, flags[v]) for a, b, v in alloc]
        d = json.loads(nbdinfo("--json", "--map=qemu:allocation-depth", uri).stdout_text)
        assert runs([(e["offset"], e["length"], e["type"]) for e in d]) == depth
        assert {e["type"] for e in d} == {0, 1, 2}
        info = json.loads(nbdinfo("--json", uri).stdout_text)["exports"][0]
        assert info["export-size"] == SIZE and info["can_multi_conn"] is True
        assert info["block_size_maximum"] == qcow2fast.nbd.MAX_PAYLOAD
    qemu_check(chain)


def test_qemu_io_write_zero_discard_over_tcp(chain, tmp_path):
    expected = bytearray(qemu_raw(chain))
    ops = [("write -P 0x31 100k 200k", 100 << 10, 200 << 10, 0x31),
           ("write -f -P 0x32 5000 3000", 5000, 3000, 0x32),            # FUA
           ("write -z 1M 300k", 1 * MiB, 300 << 10, 0),
           ("write -z -u 2M 1M", 2 * MiB, 1 * MiB, 0),                   # may unmap
           ("discard 4M 1M", 4 * MiB, 1 * MiB, 0)]                       # whole clusters
    with served(chain, tmp_path, tcp=True) as (server, uri):
        qemu_io(uri, *[op for op, *_ in ops], "flush", fmt="raw")
        for _, off, n, byte in ops:
            expected[off:off + n] = bytes([byte]) * n
        qemu_io(uri, "read -P 0x31 100k 200k", "read -P 0 1M 300k", "read -P 0 4M 1M",
                fmt="raw")
    qemu_check(chain)
    qemu_compare(chain, bytes(expected))


def test_read_only_export_refuses_writes(chain, tmp_path):
    with served(chain, tmp_path, read_only=True) as (server, uri):
        # qemu sees the read-only flag and will not even open it for writing
        # (the server's EPERM is checked with a raw client in test_nbd_protocol).
        p = qemu_io(uri, "write -P 1 0 4k", fmt="raw", check=False)
        assert "Permission denied" in p.stdout_text + p.stderr_text
        info = json.loads(nbdinfo("--json", uri).stdout_text)["exports"][0]
        assert info["is_read_only"] is True and info["can_trim"] is False
    assert "identical" in qemu_img("compare", chain, str(chain)).stdout_text
    qemu_check(chain)


def test_nbdcopy_both_directions(chain, tmp_path):
    require_libnbd()
    expected = qemu_raw(chain)
    out = str(tmp_path / "out.raw")
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        f.write(os.urandom(2 * MiB) + bytes(3 * MiB) + os.urandom(3 * MiB))
    target = qemu_create(tmp_path / "target.qcow2", SIZE, cluster_size=4096)
    with served(chain, tmp_path, read_only=True) as (server, uri):
        nbdcopy(uri, out)
    with open(out, "rb") as f:
        assert f.read() == expected
    with served(target, tmp_path, export_name="t") as (server, uri):
        nbdcopy("--connections=4", src, uri)
    qemu_check(target)
    qemu_compare(target, src)


def test_concurrent_clients(chain, tmp_path):
    require_libnbd()
    expected = bytearray(qemu_raw(chain))
    procs = []
    with served(chain, tmp_path) as (server, uri):
        for k in range(4):
            cmds = [f"write -P {0x40 + k} {k * 2}M 1M", f"write -z {k * 2 + 1}M 512k",
                    f"read -P {0x40 + k} {k * 2}M 1M"]
            args = [QEMU_IO, "-f", "raw"] + [a for c in cmds for a in ("-c", c)] + [uri]
            procs.append(subprocess.Popen(args, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT))
            expected[k * 2 * MiB:(k * 2 + 1) * MiB] = bytes([0x40 + k]) * MiB
            expected[(k * 2 + 1) * MiB:(k * 2 + 1) * MiB + 512 * 1024] = bytes(512 * 1024)
        reader = subprocess.Popen([NBDCOPY, "--connections=2", uri, "null:"],
                                  stderr=subprocess.PIPE)
        for p in procs:
            out = p.communicate(timeout=120)[0].decode()
            assert p.returncode == 0 and "fail" not in out.lower(), out
        assert reader.wait(timeout=120) == 0, reader.stderr.read()
    qemu_check(chain)
    qemu_compare(chain, bytes(expected))


def test_socket_activation(chain):
    require_libnbd()
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = ["--", "[", sys.executable, "-m", "qcow2fast", "serve", "-r", chain, "]"]
    p = subprocess.run([NBDINFO, "--json", *cmd], capture_output=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    info = json.loads(p.stdout)["exports"][0]
    assert info["export-size"] == SIZE and info["is_read_only"] is True
    p = subprocess.run([NBDINFO, "--map", *cmd], capture_output=True, env=env, timeout=120)
    assert p.returncode == 0 and b"hole,zero" in p.stdout, p.stderr.decode()


def test_raw_image(tmp_path, qemu):
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"\x5a" * 65536)
    img = RawImage(path, writable=True)
    try:
        with served(img, tmp_path) as (server, uri):
            qemu_io(uri, "write -P 0x66 1M 64k", "write -z 0 4k", "read -P 0x5a 4k 60k",
                    fmt="raw")
            m = json.loads(nbdinfo("--json", "--map", uri).stdout_text)
            assert (m[0]["offset"], m[0]["type"]) == (0, 0) and m[-1]["type"] == 3
    finally:
        img.close()
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4096] == bytes(4096) and data[4096:65536] == b"\x5a" * 61440
    assert data[MiB:MiB + 65536] == b"\x66" * 65536 and len(data) == 4 * MiB


def test_asyncio_api(chain, tmp_path):
    require_libnbd()
    sock = str(tmp_path / "a.sock")

    async def main():
        with qcow2fast.open(chain) as img:
            async with qcow2fast.nbd.serve(img, socket_path=sock):
                p = await asyncio.create_subprocess_exec(
                    NBDINFO, "--size", unix_uri(sock), stdout=asyncio.subprocess.PIPE)
                out, _ = await p.communicate()
                return p.returncode, out

    status, out = asyncio.run(main())
    assert status == 0 and int(out) == SIZE
    assert not os.path.exists(sock)


def test_cli_serve_persistent_and_sigterm(chain, tmp_path):
    sock = str(tmp_path / "cli.sock")
    p = start_cli(["-t", "--socket", sock, "--cache", "writethrough", chain], sock)
    try:
        uri = unix_uri(sock)
        qemu_io(uri, "write -P 0x77 0 64k", fmt="raw")
        qemu_io(uri, "read -P 0x77 0 64k", fmt="raw")       # still there: persistent
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0, p.stderr.read().decode()
    assert not os.path.exists(sock)
    qemu_check(chain)
    qemu_io(chain, "read -P 0x77 0 64k")


def test_cli_serve_exits_after_last_client(chain, tmp_path):
    sock = str(tmp_path / "once.sock")
    p = start_cli(["-r", "--socket", sock, chain], sock)
    qemu_img("info", unix_uri(sock))
    assert p.wait(timeout=60) == 0, p.stderr.read().decode()


def test_cli_serve_usage_errors(chain, tmp_path, capsys):
    from tests.helpers.cli_util import run_cli
    status, _, err = run_cli(capsys, "serve", "--shared", "-1", chain)
    assert status == 1 and "Invalid shared device number '-1'" in err
