"""The bitmaps extension's layouts (spec/bitmaps.py) and the dirty-run
scan (DirtyBitmap.runs / pack_runs, _ext/hooks.pyx) against small
references."""

import struct

import numpy as np
import pytest

from qcow2fast._ext.hooks import DirtyBitmap
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


def test_runs_match_a_per_granule_reference():
    """runs() and the NBD descriptors pack_runs() writes (big-endian length,
    flags 1 dirty / 0 clean; at most max_runs of them) against a
    per-granule reference: random densities, granularities and ranges, a
    short last granule, ranges past the bitmap's size (clean)."""
    rng = np.random.default_rng(7)
    for _ in range(600):
        n = int(rng.integers(1, 3000))
        gb = int(rng.integers(9, 17))
        size = (n << gb) - int(rng.integers(0, 1 << gb))     # a short last granule
        t = DirtyBitmap(size, 1 << gb)
        flags = (rng.random(n) < rng.random()).astype(np.uint8)
        t.merge(np.packbits(flags, bitorder="little"))
        past = int(rng.integers(0, 3)) << gb if rng.random() < 0.2 else 0
        a = int(rng.integers(0, size))
        b = int(rng.integers(a + 1, size + past + 1))
        ref = reference_extents(np.concatenate([flags, np.zeros(4, np.uint8)]), gb, a, b)
        assert t.runs(a, b - a) == ref
        most = int(rng.integers(1, len(ref) + 2))
        out = bytearray(8 * most)
        k = t.pack_runs(a, b - a, out, most)
        assert k == min(most, len(ref))
        assert [struct.unpack_from(">II", out, 8 * i) for i in range(k)] == \
            [(length, int(d)) for _, length, d in ref[:k]]


def test_long_runs_skip_whole_blocks_of_words():
    """Long clean and long dirty runs (the scan skips 8 words at a time)
    end exactly where a per-granule reference says."""
    rng = np.random.default_rng(3)
    for _ in range(40):
        n = int(rng.integers(1000, 300000))
        t = DirtyBitmap(n * 512, 512)
        flags = np.zeros(n, dtype=np.uint8)
        for _ in range(int(rng.integers(0, 12))):
            a = int(rng.integers(0, n))
            b = min(n, a + int(rng.integers(1, 40000)))
            flags[a:b] = 1
            t.notify(a * 512, (b - a) * 512)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], flags, [0])))).tolist()
        bounds = sorted(set([0, n] + edges))
        want = [(a * 512, (b - a) * 512, bool(flags[a])) for a, b in zip(bounds, bounds[1:])]
        assert t.runs(0, n * 512) == want


def test_runs_across_whole_words_and_bad_arguments():
    t = DirtyBitmap(1 << 30, 512)
    t.notify(64 * 512 * 3, 64 * 512 * 2)        # two whole 64-granule words dirty
    t.notify((1 << 30) - 512, 512)              # the last granule
    assert t.runs(0, 1 << 30) == [(0, 98304, False), (98304, 65536, True),
                                  (163840, (1 << 30) - 512 - 163840, False),
                                  ((1 << 30) - 512, 512, True)]
    assert t.runs(5, 0) == []
    out = bytearray(8)
    with pytest.raises(InvalidArgumentError):
        t.pack_runs(0, 1 << 32, out, 1)         # longer than a descriptor can say
    with pytest.raises(InvalidArgumentError):
        t.pack_runs(0, 4096, out, 2)            # no room for two
    with pytest.raises(InvalidArgumentError):
        t.runs(-1, 10)


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
            flags = np.unpackbits(np.frombuffer(t.bits, np.uint8), bitorder="little")
            assert set(np.flatnonzero(flags).tolist()) == ref
    with pytest.raises(InvalidArgumentError):
        DirtyBitmap(4096).resize(-1)
