"""The bitmaps extension's layouts (spec/bitmaps.py) and the dirty-extent
scan (engine/bitmap.py) against small references."""

import numpy as np
import pytest

from qcow2fast.engine.bitmap import _extents
from qcow2fast.errors import CorruptImageError, InvalidArgumentError
from qcow2fast.spec import bitmaps as bm


def reference_extents(flags, gran_bits, start, end):
    out = []
    for g in range(start >> gran_bits, ((end - 1) >> gran_bits) + 1):
        lo, hi = max(start, g << gran_bits), min(end, (g + 1) << gran_bits)
        d = bool(flags[g])
        if out and out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1] + hi - lo, d)
        else:
            out.append((lo, hi - lo, d))
    return out


def test_extents_match_a_per_granule_reference():
    rng = np.random.default_rng(7)
    for _ in range(400):
        n = int(rng.integers(1, 2000))
        flags = (rng.random(n) < rng.random()).astype(np.uint8)
        packed = np.packbits(flags, bitorder="little")
        gb = int(rng.integers(9, 17))
        size = (n << gb) - int(rng.integers(0, 1 << gb))     # a short last granule
        a = int(rng.integers(0, size))
        b = int(rng.integers(a + 1, size + 1))
        assert _extents(packed, gb, a, b) == reference_extents(flags, gb, a, b)


def test_directory_round_trip_and_limits():
    entries = [bm.BitmapEntry("a", 16, bm.BME_FLAG_AUTO, 65536, 1),
               bm.BitmapEntry("é" * 10, 9, bm.BME_FLAG_IN_USE, 131072, 2)]
    raw = bm.pack_directory(entries)
    assert len(raw) % 8 == 0
    ext = bm.BitmapsExtension(2, len(raw), 4 * 65536)
    assert bm.parse_extension(ext.pack(), 65536) == ext
    got = bm.parse_directory(raw, ext, 65536, 1 << 20, 1 << 30)
    assert [(e.name, e.granularity_bits, e.flags, e.table_offset, e.table_size)
            for e in got] == [(e.name, e.granularity_bits, e.flags, e.table_offset,
                               e.table_size) for e in entries]
    with pytest.raises(CorruptImageError, match="nb_bitmaps"):
        bm.parse_directory(raw, bm.BitmapsExtension(3, len(raw), 4 * 65536), 65536, 1 << 20)
    with pytest.raises(CorruptImageError, match="zero bitmaps"):
        bm.parse_extension(bm.BitmapsExtension(0, 8, 65536).pack(), 65536)
    with pytest.raises(CorruptImageError, match="Invalid extension length"):
        bm.parse_extension(b"\0" * 16, 65536)


def test_new_bitmap_constraints_and_sizes():
    for g in (256, 3000, 1 << 32):
        with pytest.raises(InvalidArgumentError, match="power of 2"):
            bm.check_granularity(g)
    bm.check_granularity(1 << 31)
    with pytest.raises(InvalidArgumentError, match="Use larger granularity"):
        bm.check_new_bitmap("x", 512, 1 << 42, 65536)         # 1 GiB of bits > 512 MiB
    with pytest.raises(InvalidArgumentError, match="1023"):
        bm.check_new_bitmap("x" * 1024, 65536, 1 << 20, 65536)
    assert bm.table_size_for(1 << 40, 16, 65536) == 32
    # qemu's measure: data clusters + table clusters, then the directory
    assert bm.stored_size([("b0", 16)], 64 << 20, 65536) == 3 * 65536


def test_dirty_bitmap_resize_against_a_per_granule_reference():
    """resize keeps the granules both sizes cover, the new ones clear (the
    last partial granule keeps its bit); writes after it mark up to the new
    end and no further."""
    from qcow2fast._ext.hooks import DirtyBitmap
    rng = np.random.default_rng(11)
    for _ in range(300):
        g = 512 << int(rng.integers(0, 5))
        size = int(rng.integers(0, 200)) * 512
        t, ref = DirtyBitmap(size, g), set()

        def write(off, n):
            t.notify(off, n)
            if n > 0:
                ref.update(range(off // g, min((off + n - 1) // g + 1, -(-t.size // g))))

        for _ in range(3):
            if size:
                off = int(rng.integers(0, size))
                write(off, int(rng.integers(1, size - off + 1)))
            size = int(rng.integers(0, 200)) * 512
            t.resize(size)
            ref = {x for x in ref if x < -(-size // g)}
            assert t.size == size
            write(int(rng.integers(0, size + 1)), int(rng.integers(0, 3 * g)))
            flags = np.unpackbits(t.bits, bitorder="little")
            assert set(np.flatnonzero(flags).tolist()) == ref
    with pytest.raises(InvalidArgumentError):
        DirtyBitmap(4096).resize(-1)
