"""Malformed tables and states: L1/L2 entries, compressed descriptors,
refcount blocks, the snapshot table, the corrupt bit, and read-only opens
that must never modify the file -- each a clear Qcow2Error, never a crash,
a hang or a huge allocation (see test_bad_input.py for how an attempt is
bounded)."""

import os
import zlib

import pytest

import qcow2fast
from qcow2fast.errors import (CorruptImageError, ImageClosedError, Qcow2Error,
                              ReadOnlyImageError)
from tests.helpers.bad_input import CS, attempt, copy, expect_error, make_base
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import (H_INCOMPATIBLE, INCOMPAT_CORRUPT, L2E_OFFSET_MASK,
                                     MiB, QCOW_OFLAG_COPIED, compressed_descriptor,
                                     file_state, header, is_marked_corrupt, l1_entry_offset,
                                     l2_entry_offset, make_compressed_entry, patch,
                                     patch_bytes, qemu_create, qemu_img,
                                     qemu_io, qemu_raw, read_at)

pytestmark = pytest.mark.qemu


@pytest.fixture
def base(tmp_path):
    return make_base(tmp_path)


# ------------------------------------------------------------------ tables
def test_l1_entry_unaligned(base, tmp_path):
    path = copy(base, tmp_path, "l1e.qcow2")
    at = l1_entry_offset(path, 0)
    (e,) = read_at(path, at, ">Q")
    patch(path, at, ">Q", e + 512)
    expect_error(path, CorruptImageError, ["l1", "l2", hex(at), str(at)], stage=("open", "read"))


def test_l1_entry_past_eof(base, tmp_path):
    path = copy(base, tmp_path, "l1eof.qcow2")
    at = l1_entry_offset(path, 0)
    patch(path, at, ">Q", QCOW_OFLAG_COPIED | (1 << 40))
    expect_error(path, CorruptImageError, ["l1", "l2", "eof", "end of"], stage=("open", "read"))


def test_l2_entry_unaligned(base, tmp_path):
    path = copy(base, tmp_path, "l2u.qcow2")
    at = l2_entry_offset(path, CS)
    (e,) = read_at(path, at, ">Q")
    assert e & L2E_OFFSET_MASK
    patch(path, at, ">Q", e + 512)
    expect_error(path, CorruptImageError, ["l2", "align", hex(at), str(at)],
                 stage=("open", "read"))


def test_l2_entry_past_eof(base, tmp_path):
    path = copy(base, tmp_path, "l2eof.qcow2")
    at = l2_entry_offset(path, CS)
    patch(path, at, ">Q", QCOW_OFLAG_COPIED | (1 << 40))
    expect_error(path, CorruptImageError, ["l2", "eof", "end of", "past", hex(1 << 40)],
                 stage=("open", "read"))


def _compressed_entry(path):
    at = l2_entry_offset(path, 4 * CS)
    (e,) = read_at(path, at, ">Q")
    assert e & (1 << 62), "fixture: cluster 4 is not compressed"
    return at, e


def test_compressed_descriptor_past_eof(base, tmp_path):
    path = copy(base, tmp_path, "ceof.qcow2")
    at, e = _compressed_entry(path)
    host, nsec = compressed_descriptor(e, 16)
    far = os.path.getsize(path) + 16 * CS
    patch(path, at, ">Q", make_compressed_entry(far, nsec, 16))
    expect_error(path, CorruptImageError, ["compress", "eof", "end of", hex(far), str(far)],
                 stage=("open", "read"))


def test_compressed_descriptor_huge_sector_count(base, tmp_path):
    """The sector count reaches past EOF (max count, last sector of the file)."""
    path = copy(base, tmp_path, "csec.qcow2")
    at, e = _compressed_entry(path)
    last = os.path.getsize(path) - 512
    patch(path, at, ">Q", make_compressed_entry(last, (1 << 8) - 1, 16))
    expect_error(path, CorruptImageError, ["compress", "eof", "end of", "short", "past"],
                 stage=("open", "read"))


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("garbage", ["ff", "random", "short"])
def test_garbage_compressed_data(tmp_path, ctype, garbage):
    path = qemu_create(tmp_path / f"g-{ctype}.qcow2", MiB, cluster_size=CS,
                       compression_type=ctype)
    qemu_io(path, f"write -q -c -P 0x22 {4 * CS} {CS}")
    at, e = _compressed_entry(path)
    host, nsec = compressed_descriptor(e, 16)
    n = (nsec + 1) * 512 - (host % 512)
    if garbage == "ff":
        blob = b"\xff" * n
    elif garbage == "random":
        blob = bytes((i * 151 + 7) % 256 for i in range(n))
        blob = b"\xff" + blob[1:] if ctype == "zlib" else b"\x00\x00\x00\x00" + blob[4:]
    else:
        # A valid stream that decompresses to far less than a cluster.
        if ctype == "zlib":
            c = zlib.compressobj(6, zlib.DEFLATED, -12)
            blob = c.compress(b"x" * 100) + c.flush()
        else:
            import zstandard
            blob = zstandard.ZstdCompressor().compress(b"x" * 100)
        blob = blob.ljust(n, b"\0")
    patch_bytes(path, host, blob[:n])
    expect_error(path, CorruptImageError, ["compress", "decompress", "zlib", "zstd", "deflate",
                                           hex(host), str(host)], stage=("open", "read"))


def test_refcount_block_past_eof_on_write(base, tmp_path):
    """Allocating needs the refcount block; its pointer is bogus."""
    path = copy(base, tmp_path, "rb.qcow2")
    h = header(path)
    patch(path, h["refcount_table_offset"], ">Q", 1 << 40)
    # Reading does not need refcounts, but writing (allocating) does.
    res = attempt(path, "r+", "write")
    assert "exc" in res, f"write through a bogus refcount table succeeded: {res}"
    assert "CorruptImageError" in res["mro"], res


def test_write_into_metadata_is_refused(base, tmp_path):
    """An L2 entry pointing at the refcount table: an in-place write there would
    destroy metadata.  It must fail with CorruptImageError, leave the refcount
    table intact, and (as qemu does) mark the image corrupt."""
    path = copy(base, tmp_path, "overlap.qcow2")
    h = header(path)
    rt = h["refcount_table_offset"]
    at = l2_entry_offset(path, 0)
    patch(path, at, ">Q", QCOW_OFLAG_COPIED | rt)
    with open(path, "rb") as f:
        f.seek(rt)
        table_before = f.read(CS)
    img = qcow2fast.open(path, "r+")
    try:
        with pytest.raises(CorruptImageError):
            img.write(0, b"\xee" * 4096)
            img.flush()
        with pytest.raises((CorruptImageError, ReadOnlyImageError)):
            img.write(2 * CS, b"\xee" * 4096)
            img.flush()
    finally:
        try:
            img.close()
        except Qcow2Error:
            pass
    with open(path, "rb") as f:
        f.seek(rt)
        assert f.read(CS) == table_before, "the refcount table was overwritten"
    assert is_marked_corrupt(path), "corruption found while writing must set the corrupt bit"


# ------------------------------------------------------------------ snapshot table
SNAPSHOT_CASES = [
    # name, offset in the first entry, fmt, value
    ("l1_unaligned", 0, ">Q", "L1+8"),
    ("l1_past_eof", 0, ">Q", 1 << 40),
    ("l1_size_huge", 8, ">I", 0xFFFFFFFF),
    ("extra_data_huge", 36, ">I", 0xFFFFFFF0),
    ("names_past_eof", 12, ">HH", (0xFFFF, 0xFFFF)),
]


@pytest.mark.parametrize("case", SNAPSHOT_CASES, ids=[c[0] for c in SNAPSHOT_CASES])
def test_bad_snapshot_table_entry(base, tmp_path, case):
    """qemu refuses to open these; qcow2fast must raise CorruptImageError (at
    open, or at the latest before writing) -- never crash or allocate hugely."""
    name, off, fmt, value = case
    path = copy(base, tmp_path, f"snap-{name}.qcow2")
    qemu_img("snapshot", "-c", "s1", path)
    h = header(path)
    entry = h["snapshots_offset"]
    if value == "L1+8":
        (l1,) = read_at(path, entry, ">Q")
        value = l1 + 8
    patch(path, entry + off, fmt, *(value if isinstance(value, tuple) else (value,)))
    if name.startswith("l1_"):
        # qemu opens these (read-write too) and refuses only to use that
        # snapshot (test_snapshot_damaged.py: ..._refused_only_when_used).
        res = attempt(path, "r+", "write")
        assert "exc" not in res, res
        return
    # The file is small: make "past EOF" true for names too.
    res = attempt(path)
    if "exc" in res:
        assert "CorruptImageError" in res["mro"], res
        assert "snapshot" in res["msg"].lower(), res["msg"]
    res = attempt(path, "r+", "write")
    assert "exc" in res and "CorruptImageError" in res["mro"], (
        f"writing an image with a malformed snapshot table: {res}")


def test_snapshot_table_past_eof(base, tmp_path, capsys):
    path = copy(base, tmp_path, "snapeof.qcow2")
    qemu_img("snapshot", "-c", "s1", path)
    h = header(path)
    # qemu writes the snapshot table last: cutting it loses nothing else.
    assert os.path.getsize(path) <= h["snapshots_offset"] + CS
    os.truncate(path, h["snapshots_offset"] + 45)  # the entry's id/name are cut off
    # qemu reads past the end of the file as zeros: the snapshot is listed
    # with an empty id and name, and check finds nothing wrong.  So does
    # qcow2fast.
    with qcow2fast.open(path) as img:
        assert [(s.id, s.name) for s in img.snapshots] == [("", "")]
    for args in (["snapshot", "-l"], ["check"]):
        assert run_cli(capsys, *args, path) == (0, qemu_img(*args, path).stdout_text, "")


# ------------------------------------------------------------------ corrupt bit
def test_corrupt_bit_opens_read_only(base, tmp_path):
    path = copy(base, tmp_path, "corrupt.qcow2")
    h = header(path)
    patch(path, H_INCOMPATIBLE, ">Q", h["incompatible_features"] | INCOMPAT_CORRUPT)
    expected = qemu_raw(path)
    with qcow2fast.open(path) as img:
        assert img.corrupt
        assert "corrupt bit" in img.features["incompatible"]
        assert img.read(0, img.size) == expected
        with pytest.raises(ReadOnlyImageError):
            img.write(0, b"x")
    before = file_state(path)
    try:
        img = qcow2fast.open(path, "r+")
    except Qcow2Error:
        pass                                   # refusing r+ is fine
    else:
        with img:
            assert img.read_only and img.corrupt
            for op in (lambda: img.write(0, b"x"), lambda: img.write_zeroes(0, 512),
                       lambda: img.discard(0, CS), lambda: img.writev([(0, b"y")])):
                with pytest.raises(ReadOnlyImageError):
                    op()
    assert file_state(path) == before, "a corrupt image was modified"


# ------------------------------------------------------------------ read-only
def _exercise_read_only(img):
    size = img.size
    img.read(0, size)
    img.readv([(0, 100), (size - 100, 100)])
    img.block_status()
    f = img.as_file()
    f.seek(0)
    f.read(1000)
    for op in (lambda: img.write(0, b"x"), lambda: img.write_zeroes(0, 512),
               lambda: img.discard(0, 65536), lambda: img.writev([(0, b"y")])):
        with pytest.raises(ReadOnlyImageError):
            op()
    img.flush()


@pytest.mark.parametrize("kind", ["plain", "v2", "lazy_dirty", "snapshot", "backing"])
def test_read_only_open_never_modifies(tmp_path, kind):
    path = qemu_create(tmp_path / "ro.qcow2", 2 * MiB, cluster_size=4096,
                       compat="0.10" if kind == "v2" else "1.1",
                       **({"lazy_refcounts": "on"} if kind == "lazy_dirty" else {}))
    others = []
    cmds = [f"write -q -P 0x44 0 {MiB}", "write -q -c -P 0x45 1M 4096"]
    if kind == "lazy_dirty":
        p = qemu_io(path, *cmds, "flush", "sigraise 9", check=False)
        assert p.returncode in (-9, 137)
        assert header(path)["incompatible_features"] & 1
    else:
        qemu_io(path, *cmds)
    if kind == "snapshot":
        qemu_img("snapshot", "-c", "s1", path)
        qemu_io(path, "write -q -P 0x46 0 4096")
    if kind == "backing":
        top = qemu_create(tmp_path / "top.qcow2", 2 * MiB, backing="ro.qcow2")
        qemu_io(top, "write -q -P 0x47 8192 4096")
        others, path = [path], top
    states = {p: file_state(p) for p in [path] + others}
    with qcow2fast.open(path) as img:
        assert img.read_only
        _exercise_read_only(img)
        if kind == "lazy_dirty":
            assert img.dirty
    for p, st in states.items():
        assert file_state(p) == st, f"read-only open modified {p}"


def test_closed_image_raises(base):
    img = qcow2fast.open(base)
    img.close()
    with pytest.raises(ImageClosedError):
        img.read(0, 1)
