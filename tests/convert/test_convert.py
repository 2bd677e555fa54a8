"""qcow2fast convert: every source/destination pair round-trips (qemu-img
compare and hashes), qcow2 outputs pass qemu-img check, compressed outputs
read correctly in qemu, streams in and out, sparse raw output."""

import ctypes
import hashlib
import mmap
import os
import random
import subprocess
import sys

import pytest

import qcow2fast
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import (REPO, compressible_bytes, qemu_check, qemu_create, qemu_img,
                                     qemu_info, qemu_io, qemu_map, qemu_raw)

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def sha(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """base.qcow2 <- top.qcow2 (6 MiB): data, zeros, discards, compressible
    and incompressible clusters, a partly written last cluster; plus the
    flattened content and a sparse raw copy."""
    d = tmp_path_factory.mktemp("convert")
    base = qemu_create(d / "base.qcow2", 6 * MiB)
    top = qemu_create(d / "top.qcow2", None, backing=base)
    rnd = os.urandom(MiB)
    text = compressible_bytes(random.Random(7), 2 * MiB)
    qemu_io(base, "write -P 0x11 0 2M", "write -P 0x22 4M 1M")
    qemu_io(top, "write -P 0x44 64k 64k", "write -z 1M 128k", "write -P 0 1536k 64k",
            "discard 4160k 64k", "write -P 0x55 6291000 456")
    # Random and compressible data at 2M..3M and 3M..4M+ (via raw writes into the top).
    with qcow2fast.open(top, "r+") as img:
        img.write(2 * MiB, rnd)
        img.write(3 * MiB, text[:MiB])
    expected = qemu_raw(top)
    raw = d / "flat.raw"
    qemu_img("convert", "-O", "raw", top, raw)
    return {"dir": d, "base": base, "top": top, "raw": str(raw), "expected": expected}


def check_output(path, fmt, expected):
    if fmt == "qcow2":
        qemu_check(path)
    p = qemu_img("compare", "-f", fmt, "-F", "raw", "-q", path,
                 expected if isinstance(expected, str) else _tmp_raw(path, expected),
                 check=False)
    assert p.returncode == 0, p.stdout_text + p.stderr_text
    content = qemu_raw(path, fmt=fmt)
    want = expected if not isinstance(expected, str) else open(expected, "rb").read()
    assert sha(content) == sha(want)


def cached_bytes(path):
    """Bytes of ``path`` in the page cache (mincore(2) over a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        vec = ctypes.create_string_buffer(pages)
        try:
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw) * mmap.PAGESIZE


def _tmp_raw(path, data):
    p = str(path) + ".expected"
    with open(p, "wb") as f:
        f.write(data)
    return p


QCOW2_VARIANTS = [
    [], ["-c"], ["-c", "-o", "compression_type=zstd"],
    ["-o", "cluster_size=4k,refcount_bits=1"], ["-c", "-o", "cluster_size=1k,refcount_bits=2"],
    ["-o", "compat=0.10"], ["-c", "-o", "compat=0.10,cluster_size=2M"],
    ["-o", "preallocation=metadata"], ["-o", "preallocation=falloc"],
    ["-o", "preallocation=full"], ["-o", "lazy_refcounts=on,refcount_bits=64"],
    ["-S", "0"], ["-t", "writeback", "-p"], ["-o", "extended_l2=on,cluster_size=128k"],
    # O_DIRECT output: aligned batches, clusters smaller than a page, compressed
    # clusters at byte offsets, and a target written through Image.
    ["-t", "none"], ["-t", "none", "-o", "cluster_size=1k"], ["-t", "directsync", "-c"],
    ["-t", "none", "-o", "extended_l2=on,cluster_size=128k"],
]


@pytest.mark.parametrize("src_kind", ["raw", "qcow2"])
@pytest.mark.parametrize("variant", QCOW2_VARIANTS, ids=lambda v: "_".join(v) or "plain")
def test_to_qcow2_round_trips(capsys, chain, tmp_path, src_kind, variant):
    src = chain["raw"] if src_kind == "raw" else chain["top"]
    out = tmp_path / "out.qcow2"
    status, stdout, err = run_cli(capsys, "convert", "-O", "qcow2", *variant, src, out)
    assert status == 0, err
    assert err == ""
    if "-p" in variant:                 # qemu's percent lines (test_convert_progress_like_qemu)
        assert stdout.startswith("    (0.00/100%)\r") and stdout.endswith("(100.00/100%)\r\n")
    else:
        assert stdout == ""
    if "none" in variant or "directsync" in variant:
        # O_DIRECT data: only metadata (written through the cache) is cached.
        assert cached_bytes(out) < os.path.getsize(out) // 4
    check_output(out, "qcow2", chain["expected"])
    if not any(v.startswith("preallocation") for v in variant):
        # Nothing past the image's end (the writer grows the file ahead of its writes).
        assert os.path.getsize(out) == qemu_check(out)["image-end-offset"]
    assert "backing-filename" not in qemu_info(out)          # the chain is flattened
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no temporary left


@pytest.mark.parametrize("src_kind", ["raw", "qcow2"])
@pytest.mark.parametrize("sparse", ["4k", "0", "512"])
@pytest.mark.parametrize("cache", ["unsafe", "none"])
def test_to_raw_round_trips_sparse(capsys, chain, tmp_path, src_kind, sparse, cache):
    src = chain["raw"] if src_kind == "raw" else chain["top"]
    out = tmp_path / "out.raw"
    status, _, err = run_cli(capsys, "convert", "-O", "raw", "-S", sparse, "-t", cache, src, out)
    assert status == 0, err
    cached, used = cached_bytes(out), os.stat(out).st_blocks * 512
    if cache == "none":         # O_DIRECT: the data did not go through the page cache
        assert cached <= 64 * 1024, cached
    else:
        assert cached >= used - 64 * 1024, (cached, used)
    with open(out, "rb") as f:
        assert sha(f.read()) == sha(chain["expected"])
    if sparse == "0":
        assert used >= len(chain["expected"])           # fully allocated, as qemu's -S 0
    else:
        # Holes wherever a 4 KiB block reads as zeros (the zero-filled data
        # cluster at 1.5M included), data elsewhere.
        e = chain["expected"]
        blocks = range(0, len(e), 4096)
        nonzero = sum(1 for i in blocks if e[i:i + 4096] != bytes(4096)) * 4096
        assert nonzero <= used <= nonzero + 64 * 1024



def test_compressed_clusters_and_plain_fallback(capsys, chain, tmp_path):
    out = tmp_path / "c.qcow2"
    assert run_cli(capsys, "convert", "-c", "-O", "qcow2", chain["top"], out)[0] == 0
    m = {e["start"]: e for e in qemu_map(out)}
    # The random MiB does not shrink: stored uncompressed (qemu shows its offset);
    # the compressible data is compressed (data without an offset).
    assert "offset" in m[2 * MiB] and m[2 * MiB]["length"] >= MiB
    assert m[3 * MiB]["data"] and "offset" not in m[3 * MiB]
    plain = tmp_path / "p.qcow2"
    assert run_cli(capsys, "convert", "-O", "qcow2", chain["top"], plain)[0] == 0
    assert os.path.getsize(out) < os.path.getsize(plain) - MiB


@pytest.mark.parametrize("ctype,levels", [("zlib", (1, 9)), ("zstd", (1, 19))])
def test_compression_level(capsys, chain, tmp_path, ctype, levels):
    """--compression-level: any level reads back in qemu; a higher one is smaller."""
    rng = random.Random(3)
    words = [compressible_bytes(rng, rng.randrange(3, 12)) for _ in range(2000)]
    src = tmp_path / "text.raw"       # repeated words: higher levels find more matches
    src.write_bytes(b" ".join(rng.choices(words, k=2 * MiB))[:8 * MiB])
    sizes = []
    for level in levels:
        out = tmp_path / f"l{level}.qcow2"
        status, _, err = run_cli(capsys, "convert", "-c", "--compression-level", str(level),
                                 "-O", "qcow2", "-o", f"compression_type={ctype}", src, out)
        assert status == 0, err
        check_output(out, "qcow2", str(src))
        sizes.append(os.path.getsize(out))
    assert sizes[1] < sizes[0]
    status, _, err = run_cli(capsys, "convert", "-c", "--compression-level", "23", "-O",
                             "qcow2", "-o", f"compression_type={ctype}", chain["top"],
                             tmp_path / "bad.qcow2")
    assert status == 1 and "compression level 23 out of range" in err
    status, _, err = run_cli(capsys, "convert", "--compression-level", "5", "-O", "qcow2",
                             chain["top"], tmp_path / "bad.qcow2")
    assert status == 1 and "needs compression (-c)" in err
    assert not os.path.exists(tmp_path / "bad.qcow2")


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_source(capsys, chain, tmp_path, ctype):
    """A source qemu compressed (decompressed on the pool) converts back."""
    src = tmp_path / "qc.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", chain["raw"],
             src)
    assert any(e["data"] and "offset" not in e for e in qemu_map(src))
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"o.{fmt}"
        assert run_cli(capsys, "convert", "-O", fmt, src, out)[0] == 0
        check_output(out, fmt, chain["expected"])


def test_output_is_deterministic_whatever_the_threads(capsys, chain, tmp_path):
    outs = []
    for m in ("1", "3"):
        out = tmp_path / f"m{m}.qcow2"
        assert run_cli(capsys, "convert", "-c", "-m", m, "-O", "qcow2", chain["raw"], out)[0] == 0
        outs.append(open(out, "rb").read())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_backing_copies_the_top_layer_only(capsys, chain, tmp_path, compat):
    out = tmp_path / "o.qcow2"
    status, _, err = run_cli(capsys, "convert", "-O", "qcow2", "-o", f"compat={compat}",
                             "-B", chain["base"], "-F", "qcow2", chain["top"], out)
    assert status == 0, err
    qemu_check(out)
    assert qemu_info(out)["backing-filename"] == chain["base"]
    assert sha(qemu_raw(out)) == sha(chain["expected"])
    # Only the top layer's clusters are in the new image: the base's 0x11
    # data at [0, 64k) still comes from the backing file.
    first = qemu_map(out)[0]
    assert first["start"] == 0 and first["depth"] == 1
    assert os.path.getsize(out) < 3 * MiB


def test_several_sources_are_concatenated(capsys, chain, tmp_path):
    odd = tmp_path / "odd.raw"
    with open(odd, "wb") as f:
        f.write(b"\x77" * (MiB + 512))
    out = tmp_path / "cat.qcow2"
    status, _, err = run_cli(capsys, "convert", "-O", "qcow2", chain["top"], odd, chain["raw"],
                             out)
    assert status == 0, err
    qemu_check(out)
    want = chain["expected"] + b"\x77" * (MiB + 512) + chain["expected"]
    assert qemu_info(out)["virtual-size"] == len(want)
    assert sha(qemu_raw(out)) == sha(want)


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "qcow2fast", "convert", *map(str, args)],
                          env=env, capture_output=True, **kw)


@pytest.mark.parametrize("variant", [[], ["-c", "-o", "compression_type=zstd"],
                                     ["-c", "-o", "cluster_size=4k"]])
def test_stdout_stream_is_a_valid_image(chain, tmp_path, variant):
    out = tmp_path / "piped.qcow2"
    with open(out, "wb") as f:
        # Through a pipe (cat), so nothing can seek.
        conv = subprocess.Popen([sys.executable, "-m", "qcow2fast", "convert", "-O", "qcow2",
                                 *variant, chain["top"], "-"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO))
        cat = subprocess.run(["cat"], stdin=conv.stdout, stdout=f)
        conv.stdout.close()
        assert conv.wait() == 0, conv.stderr.read()
    assert cat.returncode == 0
    check_output(out, "qcow2", chain["expected"])
    assert os.path.getsize(out) == qemu_check(out)["image-end-offset"]   # no spool slack


def test_stdin_source(tmp_path):
    data = os.urandom(MiB) + bytes(2 * MiB) + b"\x09" * 1000      # 1000: not a sector multiple
    out = tmp_path / "in.qcow2"
    p = _cli(["-O", "qcow2", "-c", "-", out], input=data)
    assert p.returncode == 0, p.stderr
    want = data + bytes(-len(data) % 512)                     # rounded up to sectors
    assert qemu_info(out)["virtual-size"] == len(want)
    check_output(out, "qcow2", want)
    # stdin to raw, sparse.
    rawout = tmp_path / "in.raw"
    p = _cli(["-O", "raw", "-", rawout], input=data)
    assert p.returncode == 0, p.stderr
    assert rawout.read_bytes() == want
    assert os.stat(rawout).st_blocks * 512 <= len(want) - 2 * MiB + 64 * 1024
    # stdin to stdout too.
    p = _cli(["-O", "qcow2", "-", "-"], input=data)
    assert p.returncode == 0, p.stderr
    piped = tmp_path / "p.qcow2"
    piped.write_bytes(p.stdout)
    check_output(piped, "qcow2", want)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("cache", ["unsafe", "none"])
def test_existing_target(capsys, chain, tmp_path, fmt, cache):
    tgt = tmp_path / f"t.{fmt}"
    qemu_img("create", "-q", "-f", fmt, tgt, "6M")
    qemu_io(tgt, "write -P 0xee 0 6M", fmt=fmt)               # must be overwritten, zeros too
    status, _, err = run_cli(capsys, "convert", "-n", "-O", fmt, "-t", cache, chain["top"],
                             tgt)
    assert status == 0, err
    check_output(tgt, fmt, chain["expected"])
    if fmt == "raw":
        # The old data under the source's zeros is deallocated (qemu's
        # write-zeroes with unmap), not overwritten with zeros.
        want = chain["expected"]
        nonzero = sum(1 for i in range(0, len(want), 4096) if any(want[i:i + 4096]))
        assert nonzero * 4096 < 6 * MiB
        assert os.stat(tgt).st_blocks * 512 <= nonzero * 4096 + 64 * 1024   # + extent tree
    fresh = tmp_path / f"f.{fmt}"
    qemu_img("create", "-q", "-f", fmt, fresh, "8M")
    status, _, err = run_cli(capsys, "convert", "-n", "--target-is-zero", "-O", fmt,
                             chain["raw"], fresh)
    assert status == 0, err
    assert sha(qemu_raw(fresh, fmt=fmt)) == sha(chain["expected"] + bytes(2 * MiB))


def test_api_progress_is_monotonic_to_completion(chain, tmp_path):
    calls = []
    qcow2fast.convert([chain["top"]], tmp_path / "api.qcow2", compress=True,
                      options={"cluster_size": 16384}, progress=lambda d, t: calls.append((d, t)))
    size = len(chain["expected"])
    assert len(calls) > 1
    assert all(t == size for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == size
    check_output(tmp_path / "api.qcow2", "qcow2", chain["expected"])


def test_options_help(capsys):
    status, out, _ = run_cli(capsys, "convert", "-O", "qcow2", "-o", "help", "a", "b")
    assert status == 0 and "compression_type=" in out and "cluster_size=" in out


@pytest.mark.parametrize("nbytes", [0, 1000])
def test_empty_and_odd_sized_sources_round_up_as_qemu(capsys, tmp_path, nbytes):
    src = tmp_path / "s.raw"
    src.write_bytes(os.urandom(nbytes))
    for fmt in ("qcow2", "raw"):
        ours, theirs = tmp_path / f"ours.{fmt}", tmp_path / f"theirs.{fmt}"
        assert run_cli(capsys, "convert", "-O", fmt, src, ours)[0] == 0
        qemu_img("convert", "-O", fmt, src, theirs)
        if fmt == "qcow2":
            qemu_check(ours)
            assert qemu_info(ours)["virtual-size"] == qemu_info(theirs)["virtual-size"]
        qemu_img("compare", "-f", fmt, "-F", fmt, ours, theirs)
    p = _cli(["-O", "qcow2", src, "-"])
    assert p.returncode == 0, p.stderr
    piped = tmp_path / "piped.qcow2"
    piped.write_bytes(p.stdout)
    qemu_check(piped)
    qemu_img("compare", piped, tmp_path / "theirs.qcow2")


def test_large_sparse_source_costs_only_its_data(tmp_path):
    """64 GiB, 5 bytes of data: empty batches are skipped; the output maps
    one cluster and progress still reaches the total."""
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:
        f.truncate(64 << 30)
        f.seek(40 << 30)
        f.write(b"hello")
    calls = []
    out = tmp_path / "big.qcow2"
    qcow2fast.convert(src, out, progress=lambda d, t: calls.append((d, t)))
    qemu_check(out)
    data = [e for e in qemu_map(out) if e["data"]]
    assert [(e["start"], e["length"]) for e in data] == [(40 << 30, 65536)]
    assert calls[-1] == (64 << 30, 64 << 30)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    with qcow2fast.open(out) as img:
        assert img.read(40 << 30, 6) == b"hello\0"


@pytest.mark.parametrize("which", ["s1", "1", "snapshot.name=s1", "snapshot.id=1,snapshot.name=s1"])
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_snapshot_source(capsys, tmp_path, which, out_fmt):
    """-l converts an internal snapshot, as qemu-img convert -l does."""
    src = qemu_create(tmp_path / "s.qcow2", 4 * MiB)
    qemu_io(src, "write -P 0x61 0 1M", "write -z 2M 64k")
    qemu_img("snapshot", "-c", "s1", src)
    qemu_io(src, "write -P 0x62 512k 1M", "discard 0 64k")
    out = str(tmp_path / f"out.{out_fmt}")
    status, _, err = run_cli(capsys, "convert", "-O", out_fmt, "-l", which, src, out)
    assert status == 0, err
    check_output(out, out_fmt, qemu_raw(src, snapshot="s1"))
    assert run_cli(capsys, "convert", "-l", "nope", src, str(tmp_path / "x.raw"))[0] == 1
    assert not os.path.exists(tmp_path / "x.raw")
