"""The metadata table cache (_ext/cache.pyx) writes back only the 4 KiB blocks
of a slice that changed, byte-swapped to big-endian for L2 slices -- when
flushed and when a dirty slot is evicted.  Eviction takes the least recently
used slot that is not pinned; a
slice is written only after the cache it depends on."""

import struct
from array import array

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
    l2[:] = array("Q", [0x1111]) * len(l2)  # changed in memory everywhere...
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
    c.raw(slot)[:] = bytes([7]) * SLICE
    c.mark_dirty(slot, 100, 101)
    c.mark_dirty(slot, 3 * 4096 + 5, 3 * 4096 + 6)
    c.flush()
    data = path.read_bytes()
    assert data[:4 * 4096] == b"\x07" * 4 * 4096   # blocks 0-3: the union's span
    assert data[4 * 4096:SLICE] == b"\xee" * (SLICE - 4 * 4096)
    slot = c.load(2 * SLICE)
    c.raw(slot)[:] = bytes([9]) * SLICE
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
        c.raw(slot)[:] = bytes([1]) * 512
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


def test_evicting_a_dirty_slot_writes_only_its_dirty_blocks(disk):
    """A one-slot L2 cache: loading another slice evicts the dirty one,
    which writes back (big-endian) only the 4 KiB blocks holding its marked
    entries; read again, the slice has the marked entries and, elsewhere,
    what the file held (not what was changed in memory but never marked)."""
    path, f = disk
    c = TableCache(f, 1, SLICE, True)
    slot = c.load(SLICE)
    l2 = c.u64(slot)
    l2[:] = array("Q", [0x2222]) * len(l2)  # changed in memory everywhere...
    l2[3] = 0xa1                                  # ...marked: entry 3 (block 0)
    l2[1500] = 0xb2                               # and entries 1500-1501 (block 2)
    l2[1501] = 0xc3
    c.mark_dirty(slot, 8 * 3, 8 * 4)
    c.mark_dirty(slot, 8 * 1500, 8 * 1502)
    assert c.ndirty == 1
    other = c.load(3 * SLICE)                     # evicts the dirty slice
    assert other == slot and c.find(SLICE) == -1 and c.key(other) == 3 * SLICE
    assert c.ndirty == 0 and not c.is_dirty(other)
    assert bytes(c.raw(other)) == b"\xee" * SLICE  # the new slice, as on disk
    data = path.read_bytes()
    written = data[SLICE:SLICE + 3 * 4096]        # blocks 0-2: the dirty range's span
    words = struct.unpack(">1536Q", written)
    assert (words[3], words[1500], words[1501]) == (0xa1, 0xb2, 0xc3)
    assert words.count(0x2222) == 1536 - 3
    # Nothing outside the span was written.
    assert data[:SLICE] == b"\xee" * SLICE
    assert data[SLICE + 3 * 4096:] == b"\xee" * (len(data) - SLICE - 3 * 4096)
    slot = c.load(SLICE)                          # back from the file
    l2 = c.u64(slot)
    assert (l2[3], l2[1500], l2[1501]) == (0xa1, 0xb2, 0xc3)
    assert l2[2000] == 0xeeeeeeeeeeeeeeee and l2[-1] == 0xeeeeeeeeeeeeeeee


def test_eviction_takes_the_least_recently_used_unpinned_slot(disk):
    path, f = disk
    c = TableCache(f, 2, SLICE, False)
    a = c.load(0)
    b = c.load(SLICE)
    assert c.load(0) == a                         # a hit: slice 0 is now the newer
    assert (c.hits, c.misses) == (1, 2)
    assert c.load(2 * SLICE) == b                 # slice 1 was the least recently used
    assert c.find(SLICE) == -1 and c.find(0) == a
    c.pin(a)
    c.load(2 * SLICE)                             # slice 2 is the most recent...
    assert c.load(3 * SLICE) == b                 # ...but slice 0 is pinned
    assert c.find(0) == a and c.find(2 * SLICE) == -1
    c.pin(b)
    with pytest.raises(RuntimeError, match="every slot is in use"):
        c.load(SLICE)
    c.unpin(a)
    assert c.load(SLICE) == a
    assert path.read_bytes() == b"\xee" * 4 * SLICE   # clean slots are never written


def test_writing_a_slot_back_writes_the_dependency_first(disk):
    """An L2 slice is written only after the refcount blocks it relies on:
    writing it back flushes the ``depends`` cache too."""
    path, f = disk
    refcounts = TableCache(f, 1, SLICE, False)
    l2 = TableCache(f, 1, SLICE, True)
    l2.depends = refcounts
    r = refcounts.load(0)
    refcounts.raw(r)[:8] = b"\x01" * 8
    refcounts.mark_dirty(r, 0, 8)
    s = l2.new(2 * SLICE)                         # a new table: zeroed and dirty
    l2.u64(s)[0] = 0x80
    l2.writeback(s)
    assert not refcounts.is_dirty(r) and not l2.is_dirty(s)
    data = path.read_bytes()
    assert data[:8] == b"\x01" * 8 and data[8:4096] == b"\xee" * (4096 - 8)
    assert data[4096:2 * SLICE] == b"\xee" * (2 * SLICE - 4096)
    assert data[2 * SLICE:3 * SLICE] == struct.pack(">Q", 0x80) + bytes(SLICE - 8)


def test_barrier_before_writing_a_changed_slot_once_per_batch(disk):
    """While an entry changed since the last barrier, writing a slot runs the
    barrier first (what the entry points to must be stable before it): once
    for a batch of slots, not again until an entry changes."""
    path, f = disk
    c = TableCache(f, 2, SLICE, True)
    events = []
    c.barrier = lambda: events.append(("barrier", path.read_bytes()[:8]))
    a, b = c.new(0), c.new(SLICE)
    c.u64(a)[0] = 0x11
    c.u64(b)[0] = 0x22
    assert c.barrier_pending
    c.flush()
    assert events == [("barrier", b"\xee" * 8)], "one barrier, before the first write"
    assert not c.barrier_pending
    c.writeback(a)                                   # clean: nothing
    c.u64(a)[1] = 0x33
    c.mark_dirty(a, 8, 16)
    c.writeback(a)
    assert len(events) == 2 and events[1][1] == struct.pack(">Q", 0x11)
    assert path.read_bytes()[8:16] == struct.pack(">Q", 0x33)


def test_cluster_aligned_keys_spread_over_the_hash(tmp_path):
    """Tables sit at cluster-aligned offsets, so their keys share their low
    bits: the hash must not depend on those (it did, and a full cache of
    64 KiB tables took over 30 probes a lookup)."""
    path = tmp_path / "h.bin"
    path.write_bytes(b"")
    f = File(path, writable=True)
    try:
        c = TableCache(f, 512, SLICE, True)
        keys = [0x50000 + 3 * i * SLICE for i in range(512)]
        for k in keys:
            c.new(k)
        probes = [c.probe_length(k) for k in keys]
        assert sum(probes) / len(probes) < 3, sum(probes) / len(probes)
        assert all(c.find(k) >= 0 for k in keys)
    finally:
        f.close()


def test_a_slot_used_after_a_mark_survives_the_cleaner(disk):
    """drop_unused(mark) keeps what was used after the mark -- also the
    most recent slot, which lookups do not stamp again until the clock
    moves (the mark moves it)."""
    path, f = disk
    c = TableCache(f, 2, SLICE, True)
    c.load(0)
    b = c.load(SLICE)                           # the most recent
    m = c.mark()
    assert c.find(SLICE) == b                   # used after the mark
    assert c.drop_unused(m) == 1                # a only
    assert c.find(0) == -1 and c.find(SLICE) == b
    m = c.mark()
    assert c.drop_unused(m) == 1                # b unused since: dropped
    assert c.used == 0
