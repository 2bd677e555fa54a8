"""The public API surface of docs/API.md."""

import io
import os
import threading

import pytest

import qcow2fast
from qcow2fast.errors import (CorruptImageError, ImageClosedError, InvalidArgumentError,
                              Qcow2Error, ReadOnlyImageError, UnsupportedFeatureError)
from tests.helpers.qemu_util import (MiB, Rng, assert_bytes_equal, compressible_bytes, qemu_check,
                                     qemu_create, qemu_io, qemu_raw)

# Tests that need the qemu oracle skip themselves (under CI=true: fail) when it
# is missing: every qemu helper calls require_qemu().


@pytest.fixture
def qimg(tmp_path):
    """A qemu-made image with data, zero, compressed clusters and a backing file."""
    rng = Rng("qimg")
    base = qemu_create(tmp_path / "base.qcow2", 8 * MiB, cluster_size=4096)
    src = tmp_path / "src"
    src.write_bytes(rng.randbytes(3 * MiB))
    qemu_io(base, f"write -q -s {src} 0 {3 * MiB}", f"write -q -s {src} {5 * MiB} {MiB}")
    top = qemu_create(tmp_path / "top.qcow2", 8 * MiB, cluster_size=65536, backing="base.qcow2")
    src2 = tmp_path / "src2"
    src2.write_bytes(compressible_bytes(rng, 65536))
    qemu_io(top, f"write -q -s {src} {MiB + 1000} {200000}", f"write -q -z {2 * MiB} {MiB}",
            f"write -q -c -s {src2} {4 * MiB} 65536", f"write -q -s {src} {7 * MiB} {MiB}")
    return top, qemu_raw(top)


@pytest.fixture
def rw(tmp_path):
    path = str(tmp_path / "rw.qcow2")
    qcow2fast.create(path, 4 * MiB, cluster_size=4096)
    return path


def test_errors_hierarchy():
    for e in (CorruptImageError, UnsupportedFeatureError, InvalidArgumentError,
              ReadOnlyImageError, ImageClosedError):
        assert issubclass(e, Qcow2Error)
    assert issubclass(qcow2fast.errors.Qcow2Error, Exception)


def test_context_manager_closes(qimg):
    path, ref = qimg
    with qcow2fast.open(path) as img:
        assert img.read(0, 10) == ref[:10]
    with pytest.raises(ImageClosedError):
        img.read(0, 10)
    img.close()                                     # closing twice is harmless


def test_context_manager_returns_image(qimg):
    path, _ = qimg
    img = qcow2fast.open(path)
    with img as same:
        assert same is img


def test_properties(qimg, tmp_path):
    path, _ = qimg
    with qcow2fast.open(path) as img:
        assert img.size == 8 * MiB
        assert img.cluster_size == 65536
        assert img.version == 3
        assert img.refcount_bits == 16
        assert img.compression_type == "zlib"
        assert img.lazy_refcounts is False
        assert img.dirty is False
        assert img.corrupt is False
        assert img.read_only is True
        assert os.path.samefile(img.path, path)
        assert img.backing_file == "base.qcow2"
        assert img.backing_format == "qcow2"
        assert img.backing is not None
        assert img.backing.cluster_size == 4096
        assert img.backing.backing is None
        assert [os.path.basename(p) for p in img.backing_chain] == ["top.qcow2", "base.qcow2"]
        f = img.features
        assert set(f) == {"incompatible", "compatible", "autoclear"}
        assert f["incompatible"] == [] and f["compatible"] == []

    p2 = str(tmp_path / "lz.qcow2")
    qcow2fast.create(p2, MiB, lazy_refcounts=True, compression_type="zstd", refcount_bits=64,
                     compat="1.1", cluster_size=512)
    with qcow2fast.open(p2, "r+") as img:
        assert img.read_only is False
        assert img.lazy_refcounts is True
        assert img.compression_type == "zstd"
        assert img.refcount_bits == 64
        assert img.cluster_size == 512
        assert img.backing is None and img.backing_file is None
        assert img.backing_chain == [img.path] or len(img.backing_chain) == 1
        assert "lazy refcounts" in img.features["compatible"]
        assert "compression type" in img.features["incompatible"]

    p3 = str(tmp_path / "v2.qcow2")
    qcow2fast.create(p3, MiB, compat="0.10")
    with qcow2fast.open(p3) as img:
        assert img.version == 2 and img.refcount_bits == 16


def test_read_readinto(qimg):
    path, ref = qimg
    with qcow2fast.open(path) as img:
        assert img.read(0, img.size) == ref
        assert img.read(5, 0) == b""
        assert img.read(img.size - 3, 3) == ref[-3:]
        buf = bytearray(100000)
        assert img.readinto(MiB - 7, buf) == len(buf)
        assert buf == ref[MiB - 7:MiB - 7 + len(buf)]
        mv = memoryview(bytearray(8192))[100:5100]
        assert img.readinto(4 * MiB - 50, mv) == 5000
        assert bytes(mv) == ref[4 * MiB - 50:4 * MiB + 4950]


def test_readv(qimg):
    path, ref = qimg
    rng = Rng("readv")
    reqs = [rng.span(8 * MiB, 300000) for _ in range(200)] + [(0, 0), (8 * MiB - 1, 1)]
    with qcow2fast.open(path) as img:
        out = img.readv(reqs)
        assert len(out) == len(reqs)
        for (off, n), b in zip(reqs, out):
            assert b == ref[off:off + n], (off, n)
        with pytest.raises(InvalidArgumentError):
            img.readv([(0, 10), (8 * MiB - 1, 2)])


def test_writev(rw):
    rng = Rng("writev")
    expected = bytearray(4 * MiB)
    reqs = []
    for _ in range(100):
        off, n = rng.span(4 * MiB, 20000)
        b = rng.randbytes(n)
        reqs.append((off, b))
        expected[off:off + n] = b                  # later requests win on overlap
    with qcow2fast.open(rw, "r+") as img:
        img.writev(reqs)
        img.writev([])
        assert img.read(0, img.size) == expected
        with pytest.raises(InvalidArgumentError):
            img.writev([(4 * MiB - 1, b"ab")])
    qemu_check(rw)
    assert_bytes_equal(qemu_raw(rw), expected)


def test_write_accepts_buffers(rw):
    with qcow2fast.open(rw, "r+") as img:
        assert img.write(0, bytearray(b"abc")) in (None, 3)
        assert img.write(3, memoryview(b"xdefx")[1:4]) in (None, 3)
        assert img.read(0, 6) == b"abcdef"


def test_out_of_range(rw):
    with qcow2fast.open(rw, "r+") as img:
        size = img.size
        for op in (lambda: img.read(size, 1), lambda: img.read(size - 1, 2),
                   lambda: img.read(-1, 1), lambda: img.read(0, -1),
                   lambda: img.write(size - 1, b"ab"), lambda: img.write(-1, b"a"),
                   lambda: img.write_zeroes(size, 512), lambda: img.write_zeroes(0, size + 1),
                   lambda: img.discard(size - 512, 1024),
                   lambda: img.readinto(size - 1, bytearray(2))):
            with pytest.raises(InvalidArgumentError):
                op()
        # Errors did not change anything.
        assert img.read(0, size) == bytes(size)
    qemu_check(rw)


def test_closed_image_errors(rw):
    img = qcow2fast.open(rw, "r+")
    img.close()
    for op in (lambda: img.read(0, 1), lambda: img.write(0, b"a"),
               lambda: img.write_zeroes(0, 512), lambda: img.discard(0, 4096),
               lambda: img.flush(), lambda: img.block_status(),
               lambda: img.readinto(0, bytearray(1)), lambda: img.readv([(0, 1)]),
               lambda: img.writev([(0, b"a")]), lambda: img.as_file()):
        with pytest.raises(ImageClosedError):
            op()
    img.close()


def test_read_only_errors(rw):
    with qcow2fast.open(rw) as img:
        assert img.read_only
        for op in (lambda: img.write(0, b"a"), lambda: img.write_zeroes(0, 512),
                   lambda: img.discard(0, 4096), lambda: img.writev([(0, b"a")])):
            with pytest.raises(ReadOnlyImageError):
                op()
        f = img.as_file()
        assert not f.writable()
        with pytest.raises((ReadOnlyImageError, io.UnsupportedOperation, OSError)):
            f.write(b"x")


def test_invalid_mode(rw):
    with pytest.raises(InvalidArgumentError):
        qcow2fast.open(rw, "w")


@pytest.mark.parametrize("kw", [
    {"cache_mode": "sometimes"}, {"l2_cache_entry_size": 1000},
    {"l2_cache_entry_size": 8192},          # larger than the 4 KiB cluster
    {"l2_cache_entry_size": 256}, {"l2_cache_size": -1}, {"refcount_cache_size": -1},
    {"cache_clean_interval": -1},
])
def test_invalid_open_options(rw, kw):
    with pytest.raises(InvalidArgumentError):
        qcow2fast.open(rw, "r+", **kw)
    # Nothing was changed by the failed opens.
    with qcow2fast.open(rw) as img:
        assert not img.dirty


def test_block_status_fresh_and_written(rw):
    with qcow2fast.open(rw, "r+") as img:
        ext = img.block_status()
        assert sum(e.length for e in ext) == img.size
        assert {e.kind for e in ext} == {"unallocated"}
        assert all(e.depth == 0 for e in ext)
        img.write(8192, b"x" * 4096)
        img.write_zeroes(65536, 8192)
        ext = img.block_status()
        data = [e for e in ext if e.kind == "data"]
        assert data and data[0].offset == 8192
        assert sum(e.length for e in data) == 4096
        assert all(e.depth == 0 for e in data) and data[0].host_offset % 4096 == 0
        zero_cover = sum(min(e.offset + e.length, 73728) - max(e.offset, 65536)
                         for e in ext if e.kind in ("zero", "unallocated")
                         and e.offset < 73728 and e.offset + e.length > 65536)
        assert zero_cover == 8192
        # A window in the middle of the data cluster.
        w = img.block_status(8192 + 100, 50)
        assert [(e.offset, e.length, e.kind) for e in w] == [(8292, 50, "data")]
        assert w[0].host_offset == data[0].host_offset + 100
        # The host offset really holds the data.
        with open(rw, "rb") as f:
            f.seek(data[0].host_offset)
            img.flush()
            assert f.read(4096) == b"x" * 4096
        # Extent is a namedtuple with the documented fields.
        e = ext[0]
        assert e._fields == ("offset", "length", "kind", "host_offset", "depth")


# ------------------------------------------------------------------ as_file
def test_as_file_read_seek(qimg):
    path, ref = qimg
    with qcow2fast.open(path) as img:
        f = img.as_file()
        assert isinstance(f, io.RawIOBase)
        assert f.readable() and f.seekable() and not f.writable()
        assert f.tell() == 0
        assert f.read(10) == ref[:10]
        assert f.tell() == 10
        assert f.seek(MiB) == MiB
        assert f.read(1000) == ref[MiB:MiB + 1000]
        assert f.seek(-100, io.SEEK_CUR) == MiB + 900
        assert f.read(200) == ref[MiB + 900:MiB + 1100]
        assert f.seek(0, io.SEEK_END) == len(ref)
        assert f.read(10) == b""
        assert f.seek(-5, io.SEEK_END) == len(ref) - 5
        assert f.read(100) == ref[-5:]                 # short read at EOF
        f.seek(len(ref) - 50000)
        assert f.read() == ref[-50000:]                # read(-1) reads to EOF
        f.seek(10)
        buf = bytearray(1234)
        assert f.readinto(buf) == 1234 and buf == ref[10:1244]
        assert f.tell() == 1244
        f.seek(len(ref) - 3)
        buf = bytearray(10)
        assert f.readinto(buf) == 3 and buf[:3] == ref[-3:]
        f.seek(100)
        assert f.readall() == ref[100:]
        with pytest.raises((ValueError, OSError)):
            f.seek(-1)
        f.seek(len(ref) + 100)                          # seeking past EOF is allowed
        assert f.read(1) == b""
        # Buffered wrappers work on top.
        f.seek(0)
        br = io.BufferedReader(f, buffer_size=4096)
        assert br.read(70000) == ref[:70000]
        f.close()
        assert f.closed


def test_as_file_write(rw):
    with qcow2fast.open(rw, "r+") as img:
        f = img.as_file()
        assert f.writable()
        f.seek(4095)
        assert f.write(b"hello") == 5
        assert f.tell() == 4100
        f.seek(-3, io.SEEK_END)
        assert f.write(b"end") == 3
        assert f.tell() == img.size
        f.seek(0)
        bw = io.BufferedWriter(f)
        bw.write(b"A" * 10000)
        bw.flush()
        assert img.read(0, 10000) == b"A" * 10000
        assert img.read(img.size - 3, 3) == b"end"
        f.seek(img.size)
        with pytest.raises((InvalidArgumentError, OSError, ValueError)):
            f.write(b"beyond")
    expected = bytearray(4 * MiB)
    expected[4095:4100] = b"hello"
    expected[0:10000] = b"A" * 10000
    expected[-3:] = b"end"
    qemu_check(rw)
    assert_bytes_equal(qemu_raw(rw), expected)


# ------------------------------------------------------------------ threads
def test_threads_read_concurrently(qimg):
    path, ref = qimg
    errors = []
    size = len(ref)

    with qcow2fast.open(path, l2_cache_size=2 * 65536) as img:
        def reader(seed):
            rng = Rng(seed)
            try:
                for _ in range(300):
                    off, n = rng.span(size, rng.choice((512, 4096, 70000, 300000)))
                    if rng.random() < 0.5:
                        got = img.read(off, n)
                    else:
                        b = bytearray(n)
                        img.readinto(off, b)
                        got = bytes(b)
                    if got != ref[off:off + n]:
                        errors.append(f"thread {seed}: read({off}, {n}) differs")
                        return
            except Exception as e:                       # noqa: BLE001
                errors.append(f"thread {seed}: {e!r}")

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
            assert not t.is_alive(), "reader thread hung"
    assert not errors, errors[:5]


def test_threads_write_disjoint_regions(tmp_path):
    """Writers on disjoint regions while readers read: the result is consistent."""
    path = str(tmp_path / "t.qcow2")
    size = 16 * MiB
    qcow2fast.create(path, size, cluster_size=4096)
    expected = bytearray(size)
    errors = []
    nthreads = 4
    region = size // nthreads
    plans = []
    for i in range(nthreads):
        rng = Rng(f"tw{i}")
        ops = []
        for _ in range(150):
            off, n = rng.span(region, 20000)
            b = rng.randbytes(n)
            ops.append((i * region + off, b))
            expected[i * region + off:i * region + off + n] = b
        plans.append(ops)

    with qcow2fast.open(path, "r+", l2_cache_size=4 * 4096) as img:
        def writer(ops):
            try:
                for off, b in ops:
                    img.write(off, b)
                    if img.read(off, len(b)) != b:
                        errors.append(f"read-back at {off} differs")
                        return
            except Exception as e:                       # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=writer, args=(p,)) for p in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
            assert not t.is_alive(), "writer thread hung"
        assert not errors, errors[:5]
        assert img.read(0, size) == expected
    qemu_check(path)
    assert_bytes_equal(qemu_raw(path), expected)


def test_cache_clean_interval(rw):
    """The periodic cache cleaner must not lose or corrupt anything."""
    import time
    expected = bytearray(4 * MiB)
    rng = Rng("clean")
    with qcow2fast.open(rw, "r+", cache_clean_interval=1) as img:
        for i in range(3):
            off, n = rng.span(4 * MiB, 100000)
            b = rng.randbytes(n)
            img.write(off, b)
            expected[off:off + n] = b
            time.sleep(0.7)
            assert img.read(0, img.size) == expected
    qemu_check(rw)
    assert_bytes_equal(qemu_raw(rw), expected)


def test_cache_clean_interval_drops_unused_entries(rw):
    """Entries unused for a whole interval are dropped; used ones come back."""
    import time
    with qcow2fast.open(rw, "r+", cache_clean_interval=1) as img:
        img.write(5000, b"x" * 3000)
        img.flush()
        assert img.cache_stats["l2_used"] > 0
        deadline = time.monotonic() + 10
        while img.cache_stats["l2_used"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert img.cache_stats["l2_used"] == 0
        assert img.cache_stats["refcount_used"] == 0
        assert img.read(5000, 3000) == b"x" * 3000      # reloaded from disk
        assert img.cache_stats["l2_used"] > 0


def test_open_accepts_pathlike(rw):
    import pathlib
    with qcow2fast.open(pathlib.Path(rw)) as img:
        assert img.size == 4 * MiB



def test_images_and_raw_files_share_the_block_device_interface(tmp_path):
    from qcow2fast.host.device import BlockDevice
    from qcow2fast.host.raw import RawImage
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\x01" * 4096)
    path = str(tmp_path / "d.qcow2")
    qcow2fast.create(path, 1 * MiB)
    with qcow2fast.open(path) as img:
        assert isinstance(img, BlockDevice)
    r = RawImage(str(raw))
    try:
        assert isinstance(r, BlockDevice)
        assert r.read(4000, 200) == b"\x01" * 96 + bytes(104)     # zeros past the end
    finally:
        r.close()
