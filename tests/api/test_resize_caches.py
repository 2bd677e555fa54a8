"""The metadata caches after a resize: sized for the new disk from the
options the image was opened with, as qemu does (qcow2_co_truncate calls
qcow2_update_options, whose read_cache_sizes recomputes them).  The
expected sizes below follow qemu's rule written out independently: by
default the L2 cache maps the whole disk up to 32 MiB, the refcount cache
holds 4 clusters, and a cache-size total goes to the L2 cache first."""

import pytest

import qcow2fast
from tests.helpers.qemu_util import qemu_check, qemu_create, qemu_io, qemu_raw_slice

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def qemu_default_l2(size, cluster_size, entry_bytes=8):
    """qemu's default l2-cache-size: every L2 entry of the disk, rounded up
    to whole clusters, at most 32 MiB."""
    clusters = -(-size // cluster_size)
    return min(-(-clusters * entry_bytes // cluster_size) * cluster_size, 32 * MiB)


def slots(img):
    return img.cache_stats["l2_slots"], img.refcount_cache.nslots


def fresh_open_slots(path, **opts):
    with qcow2fast.open(path, **opts) as img:
        return slots(img)


def check_data(path, marks):
    """qemu-img check is clean and qemu reads each (offset, byte) mark."""
    qemu_check(path)
    for off, byte in marks:
        assert qemu_raw_slice(path, off, 4096) == bytes([byte]) * 4096, hex(off)


@pytest.mark.parametrize("entry", [None, 4096])
def test_default_l2_cache_follows_the_disk(tmp_path, entry):
    """Grow 1 GiB -> 64 GiB -> 200 GiB (capped at 32 MiB) and shrink back to
    1 GiB: after each resize the L2 cache holds what qemu's default gives
    the new size (and what a fresh open gets), and the image keeps working
    through the new cache (C path reads and allocating writes)."""
    path = str(tmp_path / "a.qcow2")
    cs = 65536
    qemu_create(path, GiB, cluster_size=cs)
    qemu_io(path, "write -P 1 0 4k")
    slice_bytes = entry or cs
    opts = {} if entry is None else {"l2_cache_entry_size": entry}
    marks = {0: 1}
    with qcow2fast.open(path, "r+", **opts) as img:
        assert slots(img) == (qemu_default_l2(GiB, cs) // slice_bytes, 4)
        for size, shrink in ((64 * GiB, False), (200 * GiB, False), (GiB, True)):
            img.resize(size, shrink=shrink)
            assert slots(img) == (qemu_default_l2(size, cs) // slice_bytes, 4), size
            marks = {o: b for o, b in marks.items() if o + 4096 <= size}
            # 64 writes spread over the disk, through the new cache.
            for k in range(64):
                off = k * (size // 64) // cs * cs
                marks[off] = k + 2
                img.write(off, bytes([k + 2]) * 4096)
            assert all(img.read(o, 4096) == bytes([b]) * 4096 for o, b in marks.items())
    assert fresh_open_slots(path, **opts)[0] == qemu_default_l2(GiB, cs) // slice_bytes
    check_data(path, sorted(marks.items()))


def test_explicit_l2_cache_size_is_kept(tmp_path):
    """An l2_cache_size given at open stays what it was (qemu takes the
    option again): 1 MiB is 16 slots of 64 KiB before and after."""
    path = str(tmp_path / "b.qcow2")
    qemu_create(path, GiB)
    with qcow2fast.open(path, "r+", l2_cache_size=MiB) as img:
        before = slots(img)
        img.resize(64 * GiB)
        assert slots(img) == before == (16, 4)


def test_cache_size_total_is_split_again(tmp_path):
    """cache_size=2 MiB: on a 1 GiB disk the L2 cache takes all it needs
    (128 KiB, 2 slots) and the refcount cache the rest (30 clusters); on
    64 GiB the refcount cache drops to its 4 clusters and the L2 cache
    gets the other 1792 KiB (28 slots).  Both caches are replaced; the
    allocating writes after the resize count their clusters through the
    new refcount cache (qemu-img check clean)."""
    path = str(tmp_path / "c.qcow2")
    cs = 65536
    qemu_create(path, GiB, cluster_size=cs)
    marks = []
    with qcow2fast.open(path, "r+", cache_size=2 * MiB) as img:
        assert slots(img) == (2, (2 * MiB - 128 * KiB) // cs)
        img.write(0, b"\x05" * 4096)
        marks.append((0, 5))
        img.resize(64 * GiB)
        assert slots(img) == ((2 * MiB - 4 * cs) // cs, 4)
        for k in range(40):                     # 40 L2 tables: more than 28 slots
            off = k * (GiB + 3 * cs)
            img.write(off, bytes([k + 10]) * 4096)
            marks = [(o, b) for o, b in marks if o != off] + [(off, k + 10)]
        img.resize(GiB, shrink=True)
        assert slots(img) == (2, (2 * MiB - 128 * KiB) // cs)
        marks = [(o, b) for o, b in marks if o < GiB]
        img.write(GiB - 4096, b"\x07" * 4096)
        marks.append((GiB - 4096, 7))
    check_data(path, marks)


def test_top_of_a_chain_gets_the_chain_budget(tmp_path):
    """With a backing file the top's L2 cache is the chain budget's share
    (engine/chain.py): after growing, the same share of the new default."""
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    qemu_create(base, GiB)
    qemu_io(base, "write -P 3 0 64k")
    qcow2fast.create(top, GiB, backing_file=base, backing_format="qcow2")
    with qcow2fast.open(top, "r+") as img:
        img.resize(16 * GiB)
        grown = slots(img)
        assert grown[0] == qemu_default_l2(16 * GiB, 65536) // 65536
        img.write(8 * GiB, b"\x09" * 4096)
        assert img.read(0, 4096) == b"\x03" * 4096
    assert fresh_open_slots(top) == grown
    check_data(top, [(0, 3), (8 * GiB, 9)])
