"""The data path's extension points: the backing-chain step in C and the
write observers (dirty bitmaps), checked against qemu's view of the same
images."""

import numpy as np
import pytest

import qcow2fast
from qcow2fast._ext.hooks import DataTransform, DirtyBitmap
from qcow2fast.engine.cluster import Clusters
from qcow2fast.errors import InvalidArgumentError
from tests.helpers.qemu_util import assert_bytes_equal, qemu_create, qemu_img, qemu_io, qemu_raw

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def python_reads(monkeypatch):
    """Counts the reads that leave the C path for the Python one, on every layer."""
    calls = []
    original = Clusters.read

    def counted(self, offset, mv):
        calls.append((self.state.path, offset, len(mv)))
        return original(self, offset, mv)

    monkeypatch.setattr(Clusters, "read", counted)
    return calls


def make_chain(tmp_path, depth, *, size=8 * MiB, raw_base=False):
    """A chain qemu made: a filled base, then ``depth`` overlays each writing
    its own 64 KiB cluster (and, every third one, zeroing another)."""
    if raw_base:
        base = str(tmp_path / "base.raw")
        qemu_img("create", "-q", "-f", "raw", base, str(size // 2))     # shorter than the top
        qemu_io(base, f"write -P 0x5a 0 {size // 2}", fmt="raw")
        fmt = "raw"
    else:
        base = qemu_create(tmp_path / "base.qcow2", size)
        qemu_io(base, f"write -P 0x5a 0 {size}")
        fmt = "qcow2"
    prev = base
    for k in range(1, depth + 1):
        p = qemu_create(tmp_path / f"l{k}.qcow2", size, backing=prev, backing_fmt=fmt)
        cmds = [f"write -P {k} {(k % 100) * 64 * KiB} {64 * KiB}"]
        if k % 3 == 0:
            cmds.append(f"write -z {((k + 50) % 100) * 64 * KiB} {64 * KiB}")
        qemu_io(p, *cmds)
        prev, fmt = p, "qcow2"
    return prev


@pytest.mark.parametrize("raw_base", [False, True], ids=["qcow2-base", "raw-base"])
def test_chain_reads_in_c_match_qemu(tmp_path, python_reads, raw_base):
    top = make_chain(tmp_path, 40, raw_base=raw_base)
    expected = qemu_raw(top)
    with qcow2fast.open(top) as img:
        assert len(img.backing_chain) == 41
        got = bytearray(img.size)
        for off in range(0, img.size, 1 * MiB):      # requests crossing every kind of run
            img.readinto(off, memoryview(got)[off:off + 1 * MiB])
        assert_bytes_equal(bytes(got), expected)
        rng = np.random.default_rng(5)
        for off in rng.integers(0, img.size - 4096, 300).tolist():
            assert img.read(off, 4096) == expected[off:off + 4096]
    assert python_reads == [], "reads through the chain left the C path"


def test_compressed_cluster_deep_in_the_chain(tmp_path, python_reads):
    base = qemu_create(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -c -P 0x33 0 64k", "write -P 0x44 64k 64k")
    prev = base
    for k in range(5):
        prev = qemu_create(tmp_path / f"o{k}.qcow2", 4 * MiB, backing=prev)
    qemu_io(prev, "write -P 0x55 128k 4k")
    with qcow2fast.open(prev) as img:
        assert img.read(0, 128 * KiB) == b"\x33" * (64 * KiB) + b"\x44" * (64 * KiB)
    # Only the compressed cluster, on the base, went through Python.
    assert {p for p, _, _ in python_reads} == {base}
    with qcow2fast.open(prev, "r+") as img:          # copy-on-write from the compressed one
        img.write(100, b"\x01" * 10)
    qemu_img("check", prev)
    expected = bytearray(b"\x33" * (64 * KiB) + b"\x44" * (64 * KiB) + b"\x55" * 4096)
    expected[100:110] = b"\x01" * 10
    assert qemu_raw(prev)[:len(expected)] == bytes(expected)


def test_allocating_writes_fill_from_the_chain_in_c(tmp_path, python_reads):
    top = make_chain(tmp_path, 12)
    expected = bytearray(qemu_raw(top))
    with qcow2fast.open(top, "r+") as img:
        for off in (5 * 64 * KiB + 100, 20 * 64 * KiB - 7, 7 * MiB + 3):
            img.write(off, b"\xee" * 3000)
            expected[off:off + 3000] = b"\xee" * 3000
    assert python_reads == []
    qemu_img("check", top)
    assert_bytes_equal(qemu_raw(top), bytes(expected))


# -- write observers -------------------------------------------------------------------

def granules(bitmap):
    return [(o // bitmap.granularity, -(-(o + n) // bitmap.granularity))
            for o, n in bitmap.dirty_ranges()]


@pytest.mark.parametrize("extended_l2", [False, True], ids=["standard", "extended-l2"])
def test_every_write_path_marks_the_bitmap(tmp_path, extended_l2):
    base = qemu_create(tmp_path / "base.qcow2", 16 * MiB)
    qemu_io(base, "write -P 1 0 16M")
    top = qemu_create(tmp_path / "top.qcow2", 16 * MiB, backing=base,
                      extended_l2="on" if extended_l2 else "off")
    g = 64 * KiB
    with qcow2fast.open(top, "r+") as img:
        bm = DirtyBitmap(img.size, g)
        img.add_write_observer(bm)
        img.read(0, 4 * MiB)                            # reads mark nothing
        assert bm.dirty_ranges() == []
        img.write(1 * g + 10, b"a" * 100)               # copy-on-write from the backing file
        img.write(1 * g + 20, b"b" * 100)               # in-place overwrite (C fast path)
        img.write(3 * g, b"c" * g)                      # whole cluster (C allocating write)
        img.write_zeroes(5 * g, 2 * g)
        img.discard(9 * g, g)
        img.write_compressed(12 * g, b"d" * g)
        img.write(20 * g - 1, b"ee")                    # straddles two granules
        assert granules(bm) == [(1, 2), (3, 4), (5, 7), (9, 10), (12, 13), (19, 21)]
        assert bm.count() == 8 * g
        bm.enabled = False
        img.write(30 * g, b"f")
        bm.enabled = True
        img.remove_write_observer(bm)
        img.write(31 * g, b"g")
        assert granules(bm)[-1] == (19, 21)
    qemu_img("check", top)


def test_bitmap_granularity_and_clipping():
    bm = DirtyBitmap(1000 * 512 + 100, 512)
    bm.notify(0, 1)
    bm.notify(8 * 512, 64 * 512)                        # whole bytes of granules
    bm.notify(1000 * 512, 100)                          # the short last granule
    assert bm.dirty_ranges() == [(0, 512), (8 * 512, 64 * 512), (1000 * 512, 100)]
    assert bm.count() == 512 + 64 * 512 + 100
    assert bm.is_dirty(8 * 512) and not bm.is_dirty(512)
    bm.clear()
    assert bm.count() == 0
    for bad in (0, 511, 3000, 1 << 32):
        with pytest.raises(InvalidArgumentError):
            DirtyBitmap(1 << 20, bad)


# -- the data transform ------------------------------------------------------------------

class XorSectors(DataTransform):
    """A stand-in for encryption: each 512-byte block XORed with a byte
    derived from its host offset, or its guest offset (``by_guest``, as
    legacy AES), so a block decoded at the wrong offset reads wrong."""

    def __init__(self, block_size=512, by_guest=False):
        self.calls = 0
        self.by_guest = by_guest

    def _apply(self, buf, host, guest):
        a = np.asarray(buf)
        bs = self.block_size
        assert len(a) % bs == 0 and host % bs == 0 and guest % bs == 0
        at = guest if self.by_guest else host
        keys = ((np.arange(len(a) // bs) + at // bs) * 37 + 11) % 251 + 1
        a ^= np.repeat(keys.astype(np.uint8), bs)
        self.calls += 1
        return 0

    def decode(self, buf, host, guest):
        return self._apply(buf, host, guest)

    def encode(self, buf, host, guest):
        return self._apply(buf, host, guest)


@pytest.mark.parametrize("extended_l2", [False, True], ids=["standard", "extended-l2"])
@pytest.mark.parametrize("with_backing", [False, True], ids=["alone", "over-backing"])
@pytest.mark.parametrize("by_guest", [False, True], ids=["host-iv", "guest-iv"])
def test_transform_sees_every_data_byte(tmp_path, extended_l2, with_backing, by_guest):
    size = 8 * MiB
    backing = None
    if with_backing:
        backing = qemu_create(tmp_path / "base.qcow2", size)
        qemu_io(backing, "write -P 0x21 0 8M")
    path = qemu_create(tmp_path / "t.qcow2", size, backing=backing,
                       extended_l2="on" if extended_l2 else "off")
    model = bytearray(qemu_raw(path))
    rng = np.random.default_rng(3)
    with qcow2fast.open(path, "r+") as img:
        t = XorSectors(by_guest=by_guest)
        img.state.set_transform(t)
        for _ in range(60):
            off = int(rng.integers(0, size - 70000))
            n = int(rng.integers(1, 70000))
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            img.write(off, data)                     # allocating, copy-on-write, in place
            model[off:off + n] = data
            if rng.random() < 0.3:
                img.write(off + n // 2, b"\x7f")      # unaligned in-place overwrite (C)
                model[off + n // 2] = 0x7f
        img.write_zeroes(3 * MiB, 64 * KiB)
        model[3 * MiB:3 * MiB + 64 * KiB] = bytes(64 * KiB)
        assert img.read(0, size) == bytes(model)
        assert t.calls > 0
        with pytest.raises(qcow2fast.UnsupportedFeatureError):
            img.write_compressed(5 * MiB, bytes(64 * KiB))
    qemu_img("check", path)
    # What reached the file is encoded: through the transform it reads back,
    # without it, every cluster written reads differently.
    with qcow2fast.open(path) as img:
        img.state.set_transform(XorSectors(by_guest=by_guest))
        assert img.read(0, size) == bytes(model)
    plain = qemu_raw(path)
    with qcow2fast.open(path) as img:
        assert img.read(0, size) == plain
        written = [e for e in img.block_status() if e.kind == "data" and e.depth == 0]
    assert written
    raw = open(path, "rb").read()
    for e in written:
        assert plain[e.offset:e.offset + e.length] != bytes(model[e.offset:e.offset + e.length])
        # Each block was encoded at its own host or guest offset (decoded
        # here independently of the data path).
        lo, hi = e.offset & ~511, -(-(e.offset + e.length) // 512) * 512
        host = e.host_offset - (e.offset - lo)
        block = bytearray(raw[host:host + hi - lo])
        XorSectors(by_guest=by_guest).decode(memoryview(block), host, lo)
        assert block[e.offset - lo:e.offset - lo + e.length] == model[e.offset:e.offset + e.length]
