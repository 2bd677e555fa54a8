"""The metadata table cache writes back only the 4 KiB blocks of a slice that
changed, byte-swapped to big-endian for L2 slices."""

import struct

import pytest

from qcow2fast._ext.cache import TableCache
from qcow2fast._ext.fileio import File

SLICE = 65536


@pytest.fixture
def disk(tmp_path):
    """A file of 4 slices, every byte 0xee: what write-back did not touch shows."""
    path = tmp_path / "t.bin"
    path.write_bytes(b"\xee" * 4 * SLICE)
    f = File(path, writable=True)
    yield path, f
    f.close()


def test_writeback_writes_only_the_dirty_blocks(disk):
    path, f = disk
    c = TableCache(f, 2, SLICE, True)
    slot = c.load(SLICE)                          # the second slice
    l2 = c.u64(slot)
    l2[:] = 0x1111                                # changed in memory everywhere...
    l2[600] = 0xabcd                              # ...but only entry 600 marked
    c.mark_dirty(slot, 8 * 600, 8 * 601)
    assert c.is_dirty(slot)
    c.flush()
    assert not c.is_dirty(slot)
    data = path.read_bytes()
    block = SLICE + (8 * 600 // 4096) * 4096      # the 4 KiB block holding entry 600
    assert data[:block] == b"\xee" * block
    assert data[block + 4096:] == b"\xee" * (len(data) - block - 4096)
    words = struct.unpack(">512Q", data[block:block + 4096])
    assert words[600 - 512] == 0xabcd and words.count(0x1111) == 511


def test_dirty_ranges_merge_and_a_plain_mark_means_all(disk):
    path, f = disk
    c = TableCache(f, 2, SLICE, False)
    slot = c.load(0)
    c.raw(slot)[:] = 7
    c.mark_dirty(slot, 100, 101)
    c.mark_dirty(slot, 3 * 4096 + 5, 3 * 4096 + 6)
    c.flush()
    data = path.read_bytes()
    assert data[:4 * 4096] == b"\x07" * 4 * 4096   # blocks 0-3: the union's span
    assert data[4 * 4096:SLICE] == b"\xee" * (SLICE - 4 * 4096)
    slot = c.load(2 * SLICE)
    c.raw(slot)[:] = 9
    c.mark_dirty(slot)
    c.flush()
    assert path.read_bytes()[2 * SLICE:3 * SLICE] == b"\x09" * SLICE


def test_small_slices_are_written_whole(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(b"\xee" * 2048)
    f = File(path, writable=True)
    try:
        c = TableCache(f, 1, 512, False)
        slot = c.load(1024)
        c.raw(slot)[:] = 1
        c.mark_dirty(slot, 10, 11)
        c.flush()
    finally:
        f.close()
    assert path.read_bytes() == b"\xee" * 1024 + b"\x01" * 512 + b"\xee" * 512


def test_bad_dirty_range_is_refused(disk):
    _, f = disk
    c = TableCache(f, 1, SLICE, False)
    slot = c.load(0)
    with pytest.raises(ValueError, match="outside"):
        c.mark_dirty(slot, 10, SLICE + 1)
    assert not c.is_dirty(slot)
