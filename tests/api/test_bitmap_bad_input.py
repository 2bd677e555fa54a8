"""Broken bitmaps extensions and bad bitmap arguments: a clear error naming
the bitmap and the field, never a crash; the guest data stays readable and
nothing is written to an image opened read-only; an image whose bitmaps
are broken is not opened for writing (qemu refuses it too)."""



import pytest

import qcow2fast
from qcow2fast.errors import CorruptImageError, InvalidArgumentError, ReadOnlyImageError
from qcow2fast.spec import bitmaps as bm
from tests.helpers.qemu_util import (file_state, patch, patch_bytes, qemu_check, qemu_create,
                                     qemu_img, qemu_io, read_at, read_extensions,
                                     write_extensions)

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def bitmapped(tmp_path, name="bad.qcow2"):
    """A qemu-made image with data and two bitmaps (b0 dirty, b1 clean);
    returns (path, directory offset)."""
    path = qemu_create(tmp_path / name, 8 * MiB)
    qemu_img("bitmap", "--add", path, "b0")
    qemu_io(path, "write -P 7 0 1M")
    qemu_img("bitmap", "--add", "-g", "512", path, "b1")
    ext = dict(read_extensions(path)[0])[bm_ext()]
    _, _, _, dir_off = bm.BITMAPS_EXT.unpack(ext)
    return path, dir_off


def bm_ext():
    from qcow2fast.spec.header import EXT_BITMAPS
    return EXT_BITMAPS


def entry_at(path, dir_off, k):
    """File offset of directory entry ``k``."""
    pos = dir_off
    for _ in range(k):
        fixed = bm.DIR_ENTRY.unpack(read_at(path, pos, f"{bm.DIR_ENTRY.size}s")[0])
        pos += bm.entry_size(fixed[5], fixed[6])
    return pos


def field(path, dir_off, k, name, fmt, value):
    patch(path, entry_at(path, dir_off, k) + bm.DIR_ENTRY_FIELD_OFFSET[name], fmt, value)


def assert_refused(path, words):
    """Guest data reads; the bitmaps raise an error naming ``words``; open
    for writing is refused; nothing was written."""
    before = file_state(path)
    with qcow2fast.open(path) as img:
        assert img.read(0, MiB) == b"\7" * MiB
        with pytest.raises(CorruptImageError) as e:
            img.bitmaps
        for w in words:
            assert w in str(e.value), (w, str(e.value))
    with pytest.raises(CorruptImageError) as e:
        qcow2fast.open(path, "r+")
    for w in words:
        assert w in str(e.value)
    assert file_state(path) == before


CASES = {
    "granularity too small": ("granularity_bits", ">B", 8, ["b1", "granularity_bits"]),
    "granularity too large": ("granularity_bits", ">B", 32, ["b1", "granularity_bits"]),
    "reserved flags": ("flags", ">I", 1 << 7, ["b1", "flags"]),
    "table past EOF": ("bitmap_table_offset", ">Q", 1 << 40, ["b1", "bitmap_table_offset",
                                                              "past the end"]),
    "unaligned table": ("bitmap_table_offset", ">Q", 4096 + 512, ["b1", "bitmap_table_offset"]),
    "table too small": ("bitmap_table_size", ">I", 0, ["b1", "bitmap_table_offset"]),
    "wrong type": ("type", ">B", 2, ["b1", "type"]),
    "extra data": ("extra_data_size", ">I", 8, ["b1", "Broken bitmap directory", "entry 1"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_directory_entry(tmp_path, case):
    path, dir_off = bitmapped(tmp_path)
    name, fmt, value, words = CASES[case]
    field(path, dir_off, 1, name, fmt, value)
    assert_refused(path, words)


def test_duplicate_name(tmp_path):
    path, dir_off = bitmapped(tmp_path)
    at = entry_at(path, dir_off, 1) + bm.DIR_ENTRY.size
    patch_bytes(path, at, b"b0")
    assert_refused(path, ["b0", "twice"])


@pytest.mark.parametrize("what", ["nb_bitmaps", "directory size", "directory offset",
                                  "reserved"])
def test_broken_extension(tmp_path, what):
    path, dir_off = bitmapped(tmp_path)
    exts, _ = read_extensions(path)
    nb, res, size, off = bm.BITMAPS_EXT.unpack(dict(exts)[bm_ext()])
    new = {"nb_bitmaps": (3, res, size, off), "directory size": (nb, res, bm.MAX_DIRECTORY_SIZE
                                                                  + 8, off),
           "directory offset": (nb, res, size, off + 8), "reserved": (nb, 1, size, off)}[what]
    write_extensions(path, [(t, bm.BITMAPS_EXT.pack(*new) if t == bm_ext() else d)
                            for t, d in exts])
    words = {"nb_bitmaps": ["nb_bitmaps"], "directory size": ["bitmap_directory_size",
                                                              "exceeds"],
             "directory offset": ["bitmap_directory_offset"], "reserved": ["reserved32"]}[what]
    assert_refused(path, words)


def test_bad_table_entry_and_overlap(tmp_path):
    path, dir_off = bitmapped(tmp_path)
    e = bm.DIR_ENTRY.unpack(read_at(path, entry_at(path, dir_off, 0), f"{bm.DIR_ENTRY.size}s")[0])
    table = e[0]
    good = read_at(path, table, ">Q")[0]
    patch(path, table, ">Q", good | (1 << 60))          # reserved bits
    before = file_state(path)
    with qcow2fast.open(path) as img:
        assert img.read(0, MiB) == b"\7" * MiB
        assert img.dirty_extents("b1") == [(0, 8 * MiB, False)]
        with pytest.raises(CorruptImageError, match="b0.*table entry 0"):
            img.dirty_extents("b0")
    with pytest.raises(CorruptImageError, match="b0"):
        qcow2fast.open(path, "r+")
    assert file_state(path) == before
    # the table's data cluster pointing at the L1 table
    from tests.helpers.qemu_util import header
    patch(path, table, ">Q", header(path)["l1_table_offset"])
    with pytest.raises(CorruptImageError, match="b0.*overlaps other metadata"):
        qcow2fast.open(path, "r+")
    assert qemu_check(path, expect_clean=False)


def test_bad_arguments(tmp_path):
    path = qemu_create(tmp_path / "a.qcow2", 8 * MiB)
    with qcow2fast.open(path, "r+") as img:
        for g in (0, 256, 3000, 1 << 32):
            with pytest.raises(InvalidArgumentError, match="Granularity"):
                img.add_bitmap("g", g)
        with pytest.raises(InvalidArgumentError, match="Name length exceeds maximum"):
            img.add_bitmap("n" * 1024)
        img.add_bitmap("dup")
        with pytest.raises(InvalidArgumentError, match="already exists: dup"):
            img.add_bitmap("dup")
        with pytest.raises(InvalidArgumentError, match="'nope' not found"):
            img.dirty_extents("nope")
        with pytest.raises(InvalidArgumentError, match="outside"):
            img.dirty_extents("dup", 8 * MiB - 1, 2)
    with qcow2fast.open(path) as img:
        with pytest.raises(ReadOnlyImageError):
            img.add_bitmap("ro")
    qemu_check(path)


def test_many_bitmaps(tmp_path):
    """Up to qemu's 65535 (here a few thousand, 512-byte clusters: the limit
    is checked by count, the directory by size)."""
    path = qemu_create(tmp_path / "m.qcow2", MiB, cluster_size=512)
    with qcow2fast.open(path, "r+") as img:
        for i in range(3000):
            img.add_bitmap(f"bitmap-{i:05d}", 65536)
        img.write(0, b"x")
        d = img.dirty_bitmaps
        with pytest.raises(InvalidArgumentError, match="Maximum number"):
            saved = bm.MAX_BITMAPS
            bm.MAX_BITMAPS = 3000
            try:
                img.add_bitmap("one-more")
            finally:
                bm.MAX_BITMAPS = saved
        assert len(d.list) == 3000
    qemu_check(path)
    info = qemu_img("info", "--output=json", path).stdout_text
    assert info.count('"name": "bitmap-') == 3000
    with qcow2fast.open(path) as img:
        assert img.dirty_extents("bitmap-02999")[0] == (0, 65536, True)



def test_check_of_broken_bitmaps_is_qemu_check(tmp_path, capsys):
    """A directory qemu cannot open: check exits 1 as qemu-img does, and
    -r never frees the bitmaps' clusters.  An in_use bitmap (not loaded at
    open) with a bad table entry: the same corruption count as qemu."""
    from tests.helpers.cli_util import run_cli
    path, dir_off = bitmapped(tmp_path)
    field(path, dir_off, 0, "granularity_bits", ">B", 40)
    before = file_state(path)
    for args in (["check"], ["check", "-r", "all"], ["check", "-r", "leaks"]):
        q = qemu_img(*args, path, check=False)
        status, out, err = run_cli(capsys, *args, path)
        assert (status, out) == (q.returncode, q.stdout_text) == (1, ""), args
        assert err.replace("qcow2fast: ", "qemu-img: ") == q.stderr_text   # qemu's words
        status, _, err = run_cli(capsys, *args, "--explain", path)   # and the field
        assert status == 1 and "b0" in err and "granularity_bits" in err
    assert file_state(path) == before
    path, dir_off = bitmapped(tmp_path, "inuse.qcow2")
    field(path, dir_off, 0, "flags", ">I", bm.BME_FLAG_IN_USE | bm.BME_FLAG_AUTO)
    e = bm.DIR_ENTRY.unpack(read_at(path, entry_at(path, dir_off, 0), f"{bm.DIR_ENTRY.size}s")[0])
    patch(path, e[0], ">Q", read_at(path, e[0], ">Q")[0] | 2)       # a reserved bit
    for args in (["check"], ["check", "--output=json"]):
        q = qemu_img(*args, path, check=False)
        status, out, err = run_cli(capsys, *args, path)
        assert (status, out) == (q.returncode, q.stdout_text), (args, err, q.stderr_text)
