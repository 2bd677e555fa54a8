"""Many persistent bitmaps (the spec allows 65535): adding, storing,
reopening and closing stay linear, and a bitmap whose data did not change
keeps its table and data on disk; placement checks made in one pass give
the errors a bitmap-by-bitmap check gives."""

import json

import pytest

import qcow2fast
from qcow2fast.errors import CorruptImageError
from qcow2fast.spec import bitmaps as bm
from tests.api.test_bitmap_bad_input import bitmapped, entry_at
from tests.helpers.qemu_util import file_state, patch, qemu_check, qemu_create, qemu_img, read_at

pytestmark = pytest.mark.qemu
MiB = 1 << 20
N = 3000


def _tables(path):
    with qcow2fast.open(path) as img:
        return {b.name: (b.entry.table_offset, b.entry.table_size)
                for b in img.dirty_bitmaps.list}


def _extents(path, names):
    with qcow2fast.open(path) as img:
        return {n: img.dirty_extents(n) for n in names}


def test_thousands_of_bitmaps(tmp_path):
    path = qemu_create(tmp_path / "many.qcow2", 8 * MiB)
    with qcow2fast.open(path, "r+") as img:
        for i in range(N):
            img.add_bitmap(f"b{i}", disabled=i % 3 == 2)
        img.write(MiB, b"x" * 4096)             # marks the enabled ones
    qemu_check(path)
    info = json.loads(qemu_img("info", "--output=json", path).stdout_text)
    listed = info["format-specific"]["data"]["bitmaps"]
    assert [b["name"] for b in listed] == [f"b{i}" for i in range(N)]
    assert all(b["flags"] == ([] if i % 3 == 2 else ["auto"]) for i, b in enumerate(listed))
    sample = [f"b{i}" for i in (0, 1, 2, N // 2, N - 1)]
    dirty = [(0, MiB, False), (MiB, 65536, True), (MiB + 65536, 7 * MiB - 65536, False)]
    clean = [(0, 8 * MiB, False)]
    expected = {n: clean if int(n[1:]) % 3 == 2 else dirty for n in sample}
    assert _extents(path, sample) == expected

    # Reopened for writing and closed with nothing written: every bitmap is
    # stored anew, as qemu does at each read-write close (new clusters taken
    # before the old are freed); qemu finds the image clean.
    tables = _tables(path)
    qcow2fast.open(path, "r+").close()
    moved = _tables(path)
    assert moved.keys() == tables.keys()
    assert all(moved[n] != tables[n] for n in tables)
    tables = moved
    qemu_check(path)
    assert _extents(path, sample) == expected

    # A write: stored anew again, the disabled ones unchanged in content.
    with qcow2fast.open(path, "r+") as img:
        img.write(3 * MiB, b"y" * 512)
    after = _tables(path)
    assert all(after[n] != tables[n] for n in tables)
    qemu_check(path)
    more = dirty[:2] + [(MiB + 65536, 2 * MiB - 65536, False), (3 * MiB, 65536, True),
                        (3 * MiB + 65536, 5 * MiB - 65536, False)]
    assert _extents(path, sample) == {n: clean if int(n[1:]) % 3 == 2 else more
                                      for n in sample}


def test_bitmaps_sharing_a_data_cluster(tmp_path):
    """b1's table entry pointing at b0's data cluster: refused for writing,
    naming b1 and its table entry; nothing written."""
    path, dir_off = bitmapped(tmp_path)
    e0, e1 = (bm.DIR_ENTRY.unpack(read_at(path, entry_at(path, dir_off, k),
                                          f"{bm.DIR_ENTRY.size}s")[0]) for k in (0, 1))
    (data0,) = read_at(path, e0[0], ">Q")
    assert data0 & bm.BME_TABLE_ENTRY_OFFSET_MASK
    patch(path, e1[0], ">Q", data0)
    before = file_state(path)
    with pytest.raises(CorruptImageError, match="b1.*overlaps other metadata") as err:
        qcow2fast.open(path, "r+")
    assert err.value.offset == e1[0] and err.value.field == "bitmap table entry"
    assert file_state(path) == before
