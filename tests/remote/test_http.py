"""Remote images over HTTP (host/remote.py) from a Range server started on
localhost: qemu-made images read bit-exactly, reads coalesced into few
large requests on several connections, a local top over a remote base, and
a clear error for each way a server can misbehave."""

import json
import os
import shutil
import subprocess
import sys

import fsspec
import pytest

import qcow2fast
from qcow2fast.host.remote import RemoteReadError
from tests.helpers.qemu_util import (REPO, assert_bytes_equal, qemu_create, qemu_img,
                                     qemu_io, qemu_raw)

MiB = 1 << 20
pytestmark = pytest.mark.qemu


def _make(root, name, size="24M", cmds=("write -P 0x11 0 5M", "write -P 0x22 9M 3M",
                                         "write -z 10M 64k", "write -P 0x33 20M 68k"),
          **opts):
    path = qemu_create(root / name, size, **opts)
    if cmds:
        qemu_io(path, *cmds)
    return path


@pytest.mark.parametrize("opts", [
    {},
    {"cluster_size": 4096},
    {"cluster_size": 65536, "extended_l2": "on"},
    {"compat": "0.10"},
], ids=["64k", "4k", "subclusters", "v2"])
def test_qemu_images_read_bit_exactly(http, opts):
    server, root = http
    path = _make(root, "plain.qcow2", **opts)
    want = qemu_raw(path)
    with qcow2fast.open(f"{server.url}/plain.qcow2") as img:
        assert img.read_only and img.path == f"{server.url}/plain.qcow2"
        assert_bytes_equal(img.read(0, img.size), want)
        # Small reads across cluster and block boundaries.
        for off in (0, 4095, 5 * MiB - 100, 9 * MiB + 12345, 20 * MiB + 65530):
            assert img.read(off, 7000) == want[off:off + 7000]


def test_fsspec_http_client(http):
    """fsspec's HTTP back end, by request, reads the same bytes."""
    server, root = http
    path = _make(root, "viafsspec.qcow2")
    with qcow2fast.open(f"{server.url}/viafsspec.qcow2", remote={"http": "fsspec"}) as img:
        assert_bytes_equal(img.read(0, img.size), qemu_raw(path))
    with pytest.raises(qcow2fast.InvalidArgumentError, match="'builtin' or 'fsspec'"):
        qcow2fast.open(f"{server.url}/viafsspec.qcow2", remote={"http": "curl"})


def test_redirect_and_no_head(http):
    """A URL that redirects, on a server that refuses HEAD (a URL signed
    for GET): the size comes from a one-byte range, the bytes from the
    final URL."""
    server, root = http
    path = _make(root, "moved.qcow2")
    server.head_allowed = False
    with qcow2fast.open(f"{server.url}/_redirect/moved.qcow2") as img:
        assert img.size == 24 * MiB
        assert_bytes_equal(img.read(0, img.size), qemu_raw(path))
    assert server.counts["HEAD"] == 2                  # the redirect, then the 405


def test_buffers_are_reused_under_concurrent_reads(http):
    """Many threads reading scattered ranges through a cache far smaller
    than the image: every read right, and the request buffers reused."""
    import random
    from concurrent.futures import ThreadPoolExecutor
    server, root = http
    path = _make(root, "scatter.qcow2", "32M", ("write -P 0x5a 0 32M",
                                                 "write -P 0xa5 3M 5M", "write -P 0x3c 17M 1M"))
    want = qemu_raw(path)
    opts = {"block_size": 65536, "request_size": 256 << 10, "cache_size": MiB,
            "connections": 3}
    rng = random.Random(7)
    spans = [(rng.randrange(0, 32 * MiB - 300000), rng.randrange(1, 300000))
             for _ in range(300)]
    with qcow2fast.open(f"{server.url}/scatter.qcow2", remote=opts) as img:
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda s: img.read(*s), spans))
        stats = img.file.reader.stats()
    for (off, n), data in zip(spans, got):
        assert data == want[off:off + n], (off, n)
    assert stats["remote_blocks_cached"] <= 16
    assert stats["remote_buffers_made"] < stats["remote_requests"] // 2, stats


def test_compressed_image(http):
    server, root = http
    src = _make(root, "src.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", src, root / "comp.qcow2")
    with qcow2fast.open(f"{server.url}/comp.qcow2") as img:
        assert_bytes_equal(img.read(0, img.size), qemu_raw(src))


def test_small_reads_are_coalesced(http):
    """4 KiB reads of the whole image: a few large requests, not one per
    read; a large read runs on several connections at once."""
    server, root = http
    path = _make(root, "seq.qcow2", "32M", ("write -P 0x44 0 32M",))
    want = qemu_raw(path)
    server.reset_counts()
    opts = {"block_size": 256 << 10, "request_size": 4 * MiB, "connections": 4}
    with qcow2fast.open(f"{server.url}/seq.qcow2", remote=opts) as img:
        got = b"".join(img.read(off, 4096) for off in range(0, img.size, 4096))
    assert got == want
    reads = 32 * MiB // 4096
    assert server.counts["range"] <= 40, server.counts          # 8192 reads
    assert server.counts["range"] < reads // 100
    server.reset_counts()
    with qcow2fast.open(f"{server.url}/seq.qcow2", remote=opts) as img:
        assert img.read(0, 32 * MiB) == want
    assert server.counts["range"] >= 8                          # 4 MiB each at most
    assert server.counts["max_in_flight"] >= 2, server.counts


def test_block_cache_is_bounded(http):
    server, root = http
    _make(root, "big.qcow2", "32M", ("write -P 0x55 0 32M",))
    with qcow2fast.open(f"{server.url}/big.qcow2",
                        remote={"cache_size": 2 * MiB, "block_size": 65536}) as img:
        img.read(0, img.size)
        assert img.file.reader.stats()["remote_blocks_cached"] <= 32


def test_local_top_over_remote_base(http, tmp_path):
    """A top made by qemu-img create -b http://...: reads through the
    chain equal qemu's of the same chain with a local copy of the base
    (qemu 7.2's curl driver sometimes hangs reading a chain, so qemu reads
    the local one); writes go to the local top only."""
    server, root = http
    _make(root, "base.qcow2")
    url = f"{server.url}/base.qcow2"
    before = (root / "base.qcow2").read_bytes()
    top = qemu_create(tmp_path / "top.qcow2", None, backing=url, backing_fmt="qcow2")
    shutil.copy(root / "base.qcow2", tmp_path / "base.qcow2")
    twin = qemu_create(tmp_path / "twin.qcow2", None, backing=tmp_path / "base.qcow2",
                       backing_fmt="qcow2")
    writes = [(MiB, b"\x99" * 70000), (9 * MiB + 4096, b"\x77" * 4096)]
    with qcow2fast.open(top, "r+") as img:
        assert img.backing.path == url and img.backing.read_only
        for off, data in writes:
            img.write(off, data)
    qemu_io(twin, *(f"write -P {data[0]:#x} {off} {len(data)}" for off, data in writes))
    assert (root / "base.qcow2").read_bytes() == before
    qemu_img("check", top)                                  # opens the base over HTTP
    want = qemu_raw(twin)
    with qcow2fast.open(top) as img:
        assert_bytes_equal(img.read(0, img.size), want)
    assert want[MiB:MiB + 70000] == b"\x99" * 70000
    assert want[9 * MiB:9 * MiB + 4096] == b"\x22" * 4096


def test_remote_chain_resolved_relative_to_url(http):
    """A remote top whose backing name is relative: the base is beside it
    on the same server."""
    server, root = http
    os.makedirs(root / "d", exist_ok=True)
    _make(root, "d/base2.qcow2")
    top = qemu_create(root / "d/top2.qcow2", None, backing="base2.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 0x66 2M 1M")
    with qcow2fast.open(f"{server.url}/d/top2.qcow2") as img:
        assert img.backing.path == f"{server.url}/d/base2.qcow2"
        assert_bytes_equal(img.read(0, img.size), qemu_raw(top))


def test_open_fsspec_file_object(http):
    server, root = http
    path = _make(root, "obj.qcow2")
    with fsspec.open(f"{server.url}/obj.qcow2", "rb") as f:
        with qcow2fast.open(f) as img:
            assert_bytes_equal(img.read(0, img.size), qemu_raw(path))


def test_write_mode_is_refused(http):
    server, root = http
    _make(root, "ro.qcow2")
    with pytest.raises(qcow2fast.InvalidArgumentError, match="remote images are read-only"):
        qcow2fast.open(f"{server.url}/ro.qcow2", "r+")


MISBEHAVIOURS = {
    "short": "read failed 3 times; last: .*sent 32768 bytes instead of 65536",
    "no_range": "does not support Range requests",
    "change": "object changed since it was opened",
    "stall": "read failed 3 times; last: timed out",
    "drop": "read failed 3 times; last: .*(Payload|payload|closed|reset)",
}


@pytest.mark.parametrize("client", ["builtin", "fsspec"])
@pytest.mark.parametrize("mode", sorted(MISBEHAVIOURS))
def test_misbehaving_server(http, mode, client):
    """Each misbehaviour, every time: a clear error naming the URL and the
    offset after bounded retries; once only: retried, and the right data."""
    server, root = http
    path = _make(root, "bad.qcow2")
    want = qemu_raw(path)[9 * MiB:9 * MiB + 65536]
    url = f"{server.url}/bad.qcow2"
    server.stall_seconds = 1.0
    opts = {"timeout": 0.3, "block_size": 65536, "http": client}
    with qcow2fast.open(url, remote=opts) as img:
        (ext,) = img.block_status(9 * MiB, 65536)           # its L2 table is read now
        host = ext.host_offset
        server.misbehave(mode)
        with pytest.raises(RemoteReadError, match=MISBEHAVIOURS[mode]) as e:
            img.read(9 * MiB, 65536)
        assert e.value.filename == url and e.value.offset == host
        assert f"at offset {host:#x}" in str(e.value)
        server.misbehave(None)
        if mode == "change":
            return                   # the object stays changed: every read is refused
        assert img.read(9 * MiB, 65536) == want
    if mode != "no_range":
        with qcow2fast.open(url, remote=opts) as img:
            server.misbehave(mode, times=1)
            assert img.read(9 * MiB, 65536) == want


@pytest.mark.parametrize("client", ["builtin", "fsspec"])
def test_gone(http, client):
    server, root = http
    _make(root, "gone.qcow2")
    with qcow2fast.open(f"{server.url}/gone.qcow2",
                        remote={"block_size": 65536, "http": client}) as img:
        os.unlink(root / "gone.qcow2")
        with pytest.raises(RemoteReadError, match="the object is gone"):
            img.read(20 * MiB, 4096)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "qcow2fast", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})})


def test_cli_takes_urls(http, tmp_path):
    """info, map, check, compare and convert on a URL, against qemu-img
    (its curl driver) on the same URL."""
    server, root = http
    path = _make(root, "cli.qcow2")
    url = f"{server.url}/cli.qcow2"
    for args in (["info", "--output=json", url], ["info", url],
                 ["map", "--output=json", url], ["check", "--output=json", url]):
        ours = _cli(*args)
        assert ours.returncode == 0, ours.stderr
        theirs = qemu_img(*args).stdout_text
        if args[0] == "check":                          # qemu names the file it checked
            assert json.loads(ours.stdout) == json.loads(theirs)
        else:
            assert ours.stdout == theirs
    p = _cli("convert", "-O", "raw", url, tmp_path / "out.raw")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out.raw").read_bytes() == qemu_raw(path)
    p = _cli("compare", url, path)
    assert p.returncode == 0 and "Images are identical" in p.stdout, p.stderr
    p = _cli("check", "-r", "all", url)             # (read-only: qemu's curl driver's words)
    assert p.returncode == 1
    assert p.stderr == f"qcow2fast: Could not open '{url}': curl driver does not support writes\n"


def test_missing_extra_names_it(http):
    """Without fsspec (and aiohttp) an http URL still opens (the built-in
    client); what needs fsspec says which extra to install."""
    server, root = http
    path = _make(root, "x.qcow2")
    url = server.url + "/x.qcow2"
    code = ("import sys; sys.modules['fsspec'] = sys.modules['aiohttp'] = None\n"
            "import qcow2fast\n"
            f"print(qcow2fast.open({url!r}).read(9 << 20, 16).hex())\n"
            "for name, opts in (('s3://bucket/x.qcow2', None), "
            f"({url!r}, {{'http': 'fsspec'}})):\n"
            "    try:\n"
            "        qcow2fast.open(name, remote=opts)\n"
            "    except qcow2fast.UnsupportedFeatureError as e:\n"
            "        print(e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == qemu_raw(path)[9 * MiB:9 * MiB + 16].hex()
    assert len(lines) == 3
    assert all("pip install qcow2fast[remote]" in line for line in lines[1:]), lines


def test_needs_no_local_copy(http, tmp_path):
    """Nothing is written next to the image or in the working directory."""
    server, root = http
    _make(root, "nc.qcow2")
    before = sorted(os.listdir(root))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with qcow2fast.open(f"{server.url}/nc.qcow2") as img:
            img.read(0, img.size)
    finally:
        os.chdir(cwd)
    assert sorted(os.listdir(root)) == before and not os.listdir(tmp_path)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_read_after_fork(http):
    """serve --fork opens the image, then forks: the child reads with a
    new pool and a new connection (the parent's event loop is gone)."""
    server, root = http
    path = _make(root, "fork.qcow2")
    want = qemu_raw(path)
    with qcow2fast.open(f"{server.url}/fork.qcow2", remote={"timeout": 5}) as img:
        assert img.read(0, MiB) == want[:MiB]
        pid = os.fork()
        if pid == 0:
            try:
                ok = img.read(9 * MiB, 4 * MiB) == want[9 * MiB:13 * MiB]
            except BaseException:
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_qemu_protocol_forms(http, tmp_path):
    """qemu's names for a remote image: ``--image-opts file.driver=http,
    file.url=...`` (with the curl driver's timeout and readahead) and
    ``json:{"file": {"driver": "http", "url": ...}}``: the same output as
    qemu-img's, and convert reads them; other curl options and a driver
    that is not the URL's are refused."""
    server, root = http
    path = _make(root, "forms.qcow2")
    url = f"{server.url}/forms.qcow2"
    opts = f"driver=qcow2,file.driver=http,file.url={url},file.timeout=10,file.readahead=1M"
    node = json.dumps({"driver": "qcow2", "file": {"driver": "http", "url": url}})
    for args in (["info", "--image-opts", opts], ["info", "--output=json", "--image-opts", opts],
                 ["map", "--output=json", "--image-opts", opts], ["info", f"json:{node}"],
                 ["map", f"json:{node}"]):
        ours = _cli(*args)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == qemu_img(*args).stdout_text, args
    p = _cli("convert", "-O", "raw", "--image-opts", opts, tmp_path / "out.raw")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out.raw").read_bytes() == qemu_raw(path)
    for bad, why in ((opts + ",file.sslverify=off", "doesn't support the option 'sslverify'"),
                     (opts.replace("file.driver=http", "file.driver=https"), "needs url=https://"),
                     (opts.replace("file.timeout=10", "file.timeout=0"), "'timeout' expects"),
                     (opts.replace("file.driver=http", "file.driver=ftp"), "'ftp' is not supported")):
        p = _cli("info", "--image-opts", bad)
        assert p.returncode == 1 and why in p.stderr, (bad, p.stderr)


def test_check_reads_metadata_only(http, tmp_path):
    """check of a URL reads the metadata, not the data around it: its
    neighbouring refcount and L2 reads start no readahead stream."""
    server, root = http
    raw = tmp_path / "data.raw"
    with open(raw, "wb") as f:
        for i in range(48):
            f.write(bytes([i + 1]) * MiB)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, root / "meta.qcow2")
    server.reset_counts()
    p = _cli("check", f"{server.url}/meta.qcow2")
    assert p.returncode == 0 and "No errors were found" in p.stdout, p.stderr
    assert server.counts["bytes"] < 8 * MiB, server.counts         # of a 48 MiB file


def test_cli_dd_bench_serve_take_urls(http, tmp_path):
    """dd, bench and serve (read-only, over NBD) on a URL: dd's output and
    what qemu-img reads from the NBD export equal the image."""
    import signal
    import time
    server, root = http
    path = _make(root, "dds.qcow2")
    url = f"{server.url}/dds.qcow2"
    p = _cli("dd", "-f", "qcow2", "-O", "raw", "bs=1M", f"if={url}", f"of={tmp_path / 'dd.raw'}")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "dd.raw").read_bytes() == qemu_raw(path)
    server.reset_counts()
    p = _cli("bench", "-f", "qcow2", "-c", "2000", "-s", "4k", "-S", "12k", url)
    assert p.returncode == 0 and "Run completed" in p.stdout, p.stderr
    assert 0 < server.counts["range"] < 20, server.counts        # 2000 reads over 24 MiB
    sock, pidfile = tmp_path / "nbd.sock", tmp_path / "nbd.pid"
    p = _cli("serve", "--read-only", "--fork", "--socket", sock, "--pid-file", pidfile, url)
    assert p.returncode == 0, p.stderr
    try:
        out = qemu_img("compare", "-f", "raw", "-F", "qcow2", f"nbd+unix:///?socket={sock}",
                       path)
        assert "Images are identical" in out.stdout_text
    finally:
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.05)
    p = _cli("serve", "--socket", tmp_path / "rw.sock", url)
    assert p.returncode == 1 and "remote images are read-only" in p.stderr
