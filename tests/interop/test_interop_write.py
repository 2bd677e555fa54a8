"""Images written by qcow2fast must satisfy qemu.

After every scenario: ``qemu-img check`` reports no errors and no leaks, and
qemu's view of the content equals the in-test bytearray model.
"""

import os
import shutil

import pytest

import qcow2fast
from tests.helpers.model import ModelImage
from tests.helpers.write_util import finish, image_size, make_backing, qf_create, scenario
from tests.helpers.qemu_util import (CLUSTER_SIZES, GEOMETRIES, H_AUTOCLEAR, MiB, Rng,
                                     assert_block_status_matches_qemu, patch, qemu_raw_slice,
                                     assert_bytes_equal, assert_qemu_content, compressible_bytes,
                                     file_state, geom_id, header, qemu_check, qemu_compare,
                                     qemu_create, qemu_img, qemu_info, qemu_io, qemu_map, qemu_raw)

pytestmark = pytest.mark.qemu


# ------------------------------------------------------------------ random writes
@pytest.mark.parametrize("geom", GEOMETRIES, ids=geom_id)
def test_random_writes_matrix(tmp_path, geom):
    cs, rb, compat = geom
    rng = Rng(f"w-{geom}")
    size = image_size(cs)
    path = qf_create(tmp_path / "w.qcow2", size, cluster_size=cs, refcount_bits=rb,
                     compat=compat)
    data = scenario(path, rng)
    finish(path, data)
    qemu_compare(path, data)
    # And qemu writing after qcow2fast keeps it consistent.
    qemu_io(path, "write -q -P 0x5a 0 %d" % (cs + 512))
    qemu_check(path)


@pytest.mark.parametrize("geom", [(512, 16, "1.1"), (65536, 1, "1.1"), (65536, 16, "0.10")],
                         ids=geom_id)
def test_write_qemu_created_image(tmp_path, geom):
    """Images created and partly written by qemu, then written by qcow2fast."""
    cs, rb, compat = geom
    rng = Rng(f"qw-{geom}")
    size = image_size(cs)
    path = qemu_create(tmp_path / "q.qcow2", size, cluster_size=cs, refcount_bits=rb,
                       compat=compat)
    qemu_io(path, f"write -q -P 0x11 0 {3 * cs}", f"write -q -z {cs} {cs}",
            f"write -q -P 0x22 {size // 2} {cs + 999}")
    initial = qemu_raw(path)
    data = scenario(path, rng, initial=initial)
    finish(path, data)


@pytest.mark.parametrize("may_unmap", [False, True])
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_write_zeroes_allocation(tmp_path, may_unmap, compat):
    """may_unmap=False keeps the clusters allocated in v3 (qemu: BDRV_REQ_MAY_UNMAP
    unset -> zero flag on the allocated cluster).  qemu 7.2 itself deallocates on
    v2 images without a backing file, so v2 is only checked for content."""
    cs = 65536
    path = qf_create(tmp_path / "z.qcow2", 2 * MiB, cluster_size=cs, compat=compat)
    rng = Rng("zeroes")
    with qcow2fast.open(path, "r+") as img:
        img.write(0, rng.randbytes(8 * cs))
        img.write_zeroes(cs, 4 * cs, may_unmap=may_unmap)
        img.write_zeroes(6 * cs + 100, 1000, may_unmap=may_unmap)   # partial: data zeros
        expected = bytearray(img.read(0, img.size))
        assert expected[cs:5 * cs] == bytes(4 * cs)
        assert expected[6 * cs + 100:6 * cs + 1100] == bytes(1000)
        kinds = {e.kind for e in img.block_status(cs, 4 * cs)}
        assert kinds <= {"zero", "data", "unallocated"}
    finish(path, bytes(expected))
    if not may_unmap and compat == "1.1":
        for q in qemu_map(path):
            if q["start"] < 5 * cs and q["start"] + q["length"] > cs:
                assert "offset" in q, f"may_unmap=False freed clusters: {q}"


# ------------------------------------------------------------------ backing files


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("base_kind", ["qemu", "qcow2fast", "raw"])
def test_write_over_backing(tmp_path, cs, compat, base_kind):
    rng = Rng(f"bk-{cs}-{compat}-{base_kind}")
    size = image_size(cs)
    base_size = (size * 3 // 4) // 512 * 512         # shorter than the overlay
    base, fmt, content = make_backing(tmp_path, base_kind, base_size, rng,
                                      cs=4096 if cs == 2 * MiB else 2 * MiB if cs == 512 else cs,
                                      compat=compat)
    top = qf_create(tmp_path / "top.qcow2", size, cluster_size=cs, compat=compat,
                    backing_file=base, backing_format=fmt)
    info = qemu_info(top)
    assert info["backing-filename"] == base
    assert info.get("backing-filename-format") == fmt
    visible = content + bytes(size - base_size)
    with qcow2fast.open(top) as img:
        assert img.read(0, size) == visible
        assert img.backing_file == base
    data = scenario(top, rng, initial=visible, backing=visible)
    finish(top, data)
    # The backing file is untouched.
    assert qemu_raw(base, fmt=fmt) == content


@pytest.mark.parametrize("compressed_base", [False, True])
@pytest.mark.parametrize("cs", [512, 65536, 2 * MiB])
def test_cow_partial_clusters(tmp_path, cs, compressed_base):
    """Single small writes into unallocated clusters: the rest comes from backing
    (also from compressed clusters of a different size in the backing file)."""
    rng = Rng(f"cow-{cs}")
    size = 4 * cs if cs == 2 * MiB else 2 * MiB
    if compressed_base:
        content = b"".join(compressible_bytes(rng, 4096) for _ in range(size // 4096))
        (tmp_path / "src.raw").write_bytes(content)
        base = str(tmp_path / "cbase.qcow2")
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
                 str(tmp_path / "src.raw"), base)
    else:
        base, fmt, content = make_backing(tmp_path, "qemu", size, rng, cs=cs)
    top = qf_create(tmp_path / "top.qcow2", size, cluster_size=cs, backing_file=base,
                    backing_format="qcow2")
    expected = bytearray(content)
    with qcow2fast.open(top, "r+") as img:
        for off in (0, cs + 1, 2 * cs - 1, size - 1, size // 2 + 513):
            b = rng.randbytes(1 if off == size - 1 else 7)
            img.write(off, b)
            expected[off:off + len(b)] = b
            assert img.read(0, size) == expected
        ext = img.block_status()
        assert {e.depth for e in ext if e.kind == "data"} <= {0, 1}
        assert any(e.depth == 0 and e.kind == "data" for e in ext)
    finish(top, bytes(expected))


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_backing_chain_depth3_written(tmp_path, compat, monkeypatch):
    """qcow2fast creates base <- mid <- top with relative names (relative to the
    overlay's directory, as in qemu, not to the cwd) and writes each layer."""
    rng = Rng(f"chain3-{compat}")
    size = 3 * MiB
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    base = qf_create(tmp_path / "base.qcow2", 2 * MiB, cluster_size=4096, compat=compat)
    mid = qf_create(tmp_path / "mid.qcow2", size, cluster_size=512, compat=compat,
                    backing_file="base.qcow2", backing_format="qcow2")
    top = qf_create(tmp_path / "top.qcow2", size, cluster_size=65536, compat=compat,
                    backing_file="mid.qcow2", backing_format="qcow2")
    assert qemu_info(top)["backing-filename"] == "mid.qcow2"
    expected = bytes(size)
    for p in (base, mid, top):
        with qcow2fast.open(p, "r+") as img:
            init = expected[:img.size]
            m = ModelImage(img, init, None if p == base else init)
            m.random_ops(rng, 25)
            m.check_all()
            expected = bytes(m.data) + bytes(size - img.size)
        qemu_check(p)
    assert_qemu_content(top, expected)
    with qcow2fast.open(top) as img:
        assert len(img.backing_chain) == 3
        assert img.read(0, size) == expected


@pytest.mark.parametrize("cs", [512, 65536])
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_zeroes_and_discard_over_backing_hide_it(tmp_path, cs, compat):
    """write_zeroes over backing data must read zero, in v2 too (no zero flag)."""
    rng = Rng(f"zb-{cs}-{compat}")
    size = 2 * MiB
    base = qemu_create(tmp_path / "b.qcow2", size, cluster_size=cs, compat=compat)
    qemu_io(base, f"write -q -P 0xab 0 {size}")
    top = qf_create(tmp_path / "t.qcow2", size, cluster_size=cs, compat=compat,
                    backing_file=base, backing_format="qcow2")
    expected = bytearray(b"\xab" * size)
    with qcow2fast.open(top, "r+") as img:
        for may_unmap in (False, True):
            off = 4 * cs if may_unmap else 0
            img.write_zeroes(off, 2 * cs, may_unmap=may_unmap)        # aligned
            img.write_zeroes(off + 3 * cs - 10, 20, may_unmap=may_unmap)  # unaligned
            expected[off:off + 2 * cs] = bytes(2 * cs)
            expected[off + 3 * cs - 10:off + 3 * cs + 10] = bytes(20)
        img.write(10 * cs, rng.randbytes(cs))
        img.write_zeroes(10 * cs, cs, may_unmap=True)                 # allocated -> zero
        expected[10 * cs:11 * cs] = bytes(cs)
        assert img.read(0, size) == expected
    finish(top, bytes(expected))


# ------------------------------------------------------------------ snapshots
SNAP_GEOMS = [(cs, rb, "1.1") for cs in CLUSTER_SIZES for rb in (2, 16, 64)] + \
             [(cs, 16, "0.10") for cs in (512, 65536)]


@pytest.mark.parametrize("geom", SNAP_GEOMS, ids=geom_id)
def test_write_over_internal_snapshot(tmp_path, geom):
    cs, rb, compat = geom
    rng = Rng(f"snapw-{geom}")
    size = image_size(cs)
    path = qf_create(tmp_path / "s.qcow2", size, cluster_size=cs, refcount_bits=rb,
                     compat=compat)
    with qcow2fast.open(path, "r+") as img:
        m = ModelImage(img)
        for i in range(0, size, size // 5):
            m.write(i, rng.randbytes(min(2 * cs + 100, size - i)))
        m.random_ops(rng, 10, discard=False)
        snap1 = bytes(m.data)
    qemu_img("snapshot", "-c", "s1", path)
    qemu_check(path)
    data = scenario(path, rng, initial=snap1)
    finish(path, data)
    assert_qemu_content(path, snap1, snapshot="s1")

    # Reverting a copy to the snapshot gives the snapshot's content back.
    copy = str(tmp_path / "copy.qcow2")
    shutil.copyfile(path, copy)
    qemu_img("snapshot", "-a", "s1", copy)
    qemu_check(copy)
    assert_qemu_content(copy, snap1)

    # Deleting the snapshot must drop every refcount it held: no leaks.
    qemu_img("snapshot", "-d", "s1", path)
    qemu_check(path)
    assert_qemu_content(path, data)


def test_write_over_two_qemu_snapshots(tmp_path):
    rng = Rng("twosnaps")
    cs = 4096
    size = 2 * MiB
    path = qemu_create(tmp_path / "s.qcow2", size, cluster_size=cs)
    qemu_io(path, f"write -q -P 0x61 0 {size // 2}")
    qemu_img("snapshot", "-c", "a", path)
    # (qemu compresses only into unallocated clusters: the last one is.)
    qemu_io(path, f"write -q -P 0x62 {size // 4} {size // 2}",
            f"write -q -c -P 0x63 {size - cs} {cs}")
    qemu_img("snapshot", "-c", "b", path)
    snap_a = qemu_raw(path, snapshot="a")
    snap_b = qemu_raw(path, snapshot="b")
    data = scenario(path, rng, initial=snap_b, ops=60)
    finish(path, data)
    assert_qemu_content(path, snap_a, snapshot="a")
    assert_qemu_content(path, snap_b, snapshot="b")
    qemu_img("snapshot", "-d", "a", path)
    qemu_img("snapshot", "-d", "b", path)
    finish(path, data)


# ------------------------------------------------------------------ compressed
@pytest.mark.parametrize("cs", CLUSTER_SIZES)
@pytest.mark.parametrize("ctype,compat", [("zlib", "0.10"), ("zlib", "1.1"), ("zstd", "1.1")])
def test_overwrite_compressed_clusters(tmp_path, cs, ctype, compat):
    rng = Rng(f"cw-{cs}-{ctype}-{compat}")
    nclusters = 6 if cs == 2 * MiB else max(16, MiB // cs)
    size = nclusters * cs
    raw = b"".join(compressible_bytes(rng, cs) if i % 3 else rng.randbytes(cs)
                   for i in range(nclusters))
    src = tmp_path / "src.raw"
    src.write_bytes(raw)
    path = str(tmp_path / "c.qcow2")
    opts = f"cluster_size={cs},compat={compat}"
    if compat == "1.1":
        opts += f",compression_type={ctype}"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, str(src), path)
    compressed = [q for q in qemu_map(path) if q["data"] and "offset" not in q]
    assert compressed
    expected = bytearray(raw)
    with qcow2fast.open(path, "r+") as img:
        assert img.compression_type == ctype
        c = compressed[0]["start"] // cs
        for off, n in ((c * cs + 1, 10), ((c + 1) * cs - 5, 10), ((c + 3) * cs, cs)):
            n = min(n, size - off)
            b = rng.randbytes(n)
            img.write(off, b)                  # partial: decompress + COW
            expected[off:off + n] = b
        m = ModelImage(img, bytes(expected))
        m.write_zeroes(((c + 4) % nclusters) * cs, cs, may_unmap=True)
        m.write_zeroes(((c + 5) % nclusters) * cs + 3, 100)
        m.discard(((c + 2) % nclusters) * cs, cs)
        m.random_ops(rng, 20)
        m.check_all()
        expected = bytes(m.data)
    finish(path, expected)


# ------------------------------------------------------------------ cache modes
@pytest.mark.parametrize("cache_mode", ["writeback", "writethrough", "unsafe", "none",
                                        "directsync"])
@pytest.mark.parametrize("cs", [4096, 65536])
def test_cache_modes(tmp_path, cache_mode, cs):
    rng = Rng(f"cache-{cache_mode}-{cs}")
    size = image_size(cs)
    path = qf_create(tmp_path / "m.qcow2", size, cluster_size=cs)
    base, _, content = make_backing(tmp_path, "qemu", size // 2, rng)
    top = qf_create(tmp_path / "t.qcow2", size, cluster_size=cs, backing_file=base,
                    backing_format="qcow2")
    for p, initial in ((path, None), (top, content + bytes(size - len(content)))):
        data = scenario(p, rng, ops=30, initial=initial, backing=initial,
                        cache_mode=cache_mode)
        finish(p, data)


def test_invalid_cache_mode(tmp_path):
    path = qf_create(tmp_path / "x.qcow2", MiB)
    with pytest.raises(qcow2fast.errors.InvalidArgumentError):
        qcow2fast.open(path, "r+", cache_mode="sometimes")


# ------------------------------------------------------------------ small caches
@pytest.mark.parametrize("cs,entry", [(512, None), (4096, None), (65536, 4096),
                                      (65536, 512)])
def test_small_caches_force_evictions(tmp_path, cs, entry):
    rng = Rng(f"smallcache-{cs}-{entry}")
    size = 16 * MiB if cs == 512 else 64 * MiB
    path = qf_create(tmp_path / "s.qcow2", size, cluster_size=cs, refcount_bits=16)
    kw = dict(l2_cache_size=2 * (entry or cs), refcount_cache_size=4 * cs)
    if entry:
        kw["l2_cache_entry_size"] = entry
    expected = bytearray(size)
    with qcow2fast.open(path, "r+", **kw) as img:
        m = ModelImage(img, bytes(expected))
        # Scattered writes over many L2 tables, revisiting old ones.
        offsets = [rng.randrange(0, size - 5000) for _ in range(150)]
        for off in offsets + offsets[::3]:
            m.write(off, rng.randbytes(rng.randint(1, 5000)))
        m.random_ops(rng, 30)
        for off in offsets[::5]:
            m.check_read(off, 5000)
        expected = bytes(m.data)
    finish(path, expected)
    with qcow2fast.open(path, **kw) as img:
        assert img.read(0, size) == expected


def test_refcount_table_growth(tmp_path):
    """512-byte clusters and 64-bit refcounts: one refcount block covers 32 KiB,
    the initial refcount table ~2 MiB; writing 24 MiB must grow it repeatedly."""
    rng = Rng("growth")
    size = 64 * MiB
    path = qf_create(tmp_path / "g.qcow2", size, cluster_size=512, refcount_bits=64)
    rt0 = header(path)["refcount_table_clusters"]
    expected = bytearray(size)
    chunk = MiB
    slots = list(range(0, size, chunk))
    rng.shuffle(slots)
    with qcow2fast.open(path, "r+", refcount_cache_size=4 * 512) as img:
        for off in slots[:24]:
            b = rng.randbytes(chunk - 1536)
            at = off + 512 * rng.randrange(0, 3)
            img.write(at, b)
            expected[at:at + len(b)] = b
        img.write_zeroes(slots[0], chunk, may_unmap=True)
        expected[slots[0]:slots[0] + chunk] = bytes(chunk)
        # One large unaligned write across hundreds of L2 tables.
        big = rng.randbytes(8 * MiB + 777)
        img.write(40 * MiB + 333, big)
        expected[40 * MiB + 333:40 * MiB + 333 + len(big)] = big
        img.flush()
        assert_bytes_equal(img.read(0, size), expected, "qcow2fast read after growth")
    h = header(path)
    assert h["refcount_table_clusters"] > rt0, "refcount table did not grow"
    assert os.path.getsize(path) > 24 * MiB
    finish(path, bytes(expected))
    qemu_compare(path, bytes(expected))


@pytest.mark.parametrize("cs,size", [(512, 8 << 30), (65536, 1 << 40), (2 * MiB, 4 << 40)])
def test_large_virtual_offsets(tmp_path, cs, size):
    """Offsets past 2**31, 2**32 (and 2**40): no 32-bit truncation anywhere."""
    rng = Rng(f"bigoff-{cs}")
    path = qf_create(tmp_path / "big.qcow2", size, cluster_size=cs)
    candidates = sorted({(1 << 31) - 3, (1 << 32) - 700, (1 << 32) + 12345, (5 << 32) + 7,
                         (1 << 40) - 4000, (1 << 40) + 1099, size // 2 + 10001, size - 5000})
    spots = []
    for s in candidates:                  # keep writes (+100 bytes of margin) apart
        if s + 5000 <= size and (not spots or s >= spots[-1] + 3300):
            spots.append(s)
    writes = []
    with qcow2fast.open(path, "r+") as img:
        for off in spots:
            b = rng.randbytes(3000)
            img.write(off, b)
            writes.append((off, b))
        img.write_zeroes(spots[0] + 1000, 500)
        writes[0] = (spots[0], writes[0][1][:1000] + bytes(500) + writes[0][1][1500:])
        for off, b in writes:
            assert img.read(off - 100, len(b) + 200) == bytes(100) + b + bytes(100)
        got = img.readv([(off, len(b)) for off, b in writes])
        assert got == [b for _, b in writes]
        extents = img.block_status()
    qemu_check(path)
    assert_block_status_matches_qemu(extents, qemu_map(path), size, 1)
    for off, b in writes:
        assert qemu_raw_slice(path, off - 100, len(b) + 200) == bytes(100) + b + bytes(100), \
            f"qemu reads something else at {off:#x}"


def test_unknown_autoclear_bits_cleared_on_write(tmp_path):
    """qcow2.txt: one may only write to an image with unknown auto-clear bits
    after clearing them."""
    path = qemu_create(tmp_path / "ac.qcow2", 2 * MiB, cluster_size=4096)
    qemu_io(path, "write -q -P 0x31 0 8192")
    patch(path, H_AUTOCLEAR, ">Q", 1 << 9)
    before = file_state(path)
    with qcow2fast.open(path) as img:
        assert img.read(0, 8192) == b"\x31" * 8192
    assert file_state(path) == before
    with qcow2fast.open(path, "r+") as img:
        img.write(100000, b"z" * 5000)
    assert header(path)["autoclear_features"] & (1 << 9) == 0, "unknown autoclear bit kept"
    expected = bytearray(2 * MiB)
    expected[0:8192] = b"\x31" * 8192
    expected[100000:105000] = b"z" * 5000
    finish(path, bytes(expected))


def test_persistent_bitmap_image(tmp_path):
    """An image with a persistent dirty bitmap: readable, and written with
    the bitmap kept consistent and marking the write (tests/interop/
    test_bitmaps.py has the rest)."""
    path = qemu_create(tmp_path / "bm.qcow2", 2 * MiB, cluster_size=65536)
    qemu_io(path, "write -q -P 0x41 0 65536")
    qemu_img("bitmap", "--add", path, "bm0")
    assert header(path)["autoclear_features"] & 1
    with qcow2fast.open(path) as img:
        assert img.read(0, 2 * MiB) == qemu_raw(path)
        assert "bitmaps" in img.features["autoclear"]
    with qcow2fast.open(path, "r+") as img:
        img.write(65536, b"b" * 4096)
    assert header(path)["autoclear_features"] & 1
    with qcow2fast.open(path) as img:
        assert img.dirty_extents("bm0") == [(0, 65536, False), (65536, 65536, True),
                                            (131072, 2 * MiB - 131072, False)]
    qemu_check(path)


@pytest.mark.parametrize("source", ["qcow2fast", "qemu"])
@pytest.mark.parametrize("backing", [False, True])
def test_partial_write_into_zero_alloc_cluster(tmp_path, source, backing):
    """A zero cluster that keeps its allocation (v3 zero flag + host offset) still
    holds the old bytes on disk: a partial write must not resurrect them (nor
    the backing file's bytes)."""
    cs = 65536
    size = 2 * MiB
    kw = {}
    initial = bytes(size)
    if backing:
        base = qemu_create(tmp_path / "b.qcow2", size, cluster_size=cs)
        qemu_io(base, f"write -q -P 0xbb 0 {size}")
        kw = dict(backing_file=str(base), backing_format="qcow2")
        initial = b"\xbb" * size
    path = qf_create(tmp_path / "z.qcow2", size, cluster_size=cs, **kw)
    old = b"\xee" * (4 * cs)
    if source == "qemu":
        qemu_io(path, f"write -q -P 0xee 0 {4 * cs}", f"write -q -z 0 {4 * cs}")
        assert all("offset" in q for q in qemu_map(path) if q["start"] < 4 * cs), \
            "fixture: qemu did not keep the allocation"
    else:
        with qcow2fast.open(path, "r+") as img:
            img.write(0, old)
            img.write_zeroes(0, 4 * cs, may_unmap=False)
    expected = bytearray(initial)
    expected[:4 * cs] = bytes(4 * cs)
    with qcow2fast.open(path, "r+") as img:
        assert img.read(0, 4 * cs) == bytes(4 * cs)
        for off, n in ((100, 10), (cs + cs // 2, 1), (3 * cs - 5, 10)):
            img.write(off, b"\x01" * n)
            expected[off:off + n] = b"\x01" * n
        img.write_zeroes(2 * cs + 7, 9, may_unmap=False)
        assert img.read(0, size) == expected
    finish(path, bytes(expected))


def test_partial_writes_into_recycled_clusters(tmp_path):
    """Freed host clusters still hold old bytes; a partial write allocating one
    of them must zero (or COW) the rest of the cluster."""
    cs = 4096
    size = 4 * MiB
    path = qf_create(tmp_path / "r.qcow2", size, cluster_size=cs)
    rng = Rng("recycle")
    with qcow2fast.open(path, "r+") as img:
        img.write(0, rng.randbytes(MiB))          # 256 clusters of garbage...
        img.discard(0, MiB)                       # ...freed
        img.flush()
        assert img.read(0, MiB) == bytes(MiB)
        expected = bytearray(size)
        for i in range(200):                      # new partial allocations
            off = 2 * MiB + i * cs + (i * 37) % (cs - 20)
            img.write(off, b"\x02" * 20)
            expected[off:off + 20] = b"\x02" * 20
        assert img.read(0, size) == expected
    finish(path, bytes(expected))
    assert os.path.getsize(path) < 3 * MiB, "freed clusters were not reused"


def test_write_after_qemu_grew_refcount_table(tmp_path):
    """qemu grows (and moves) the refcount table; qcow2fast must read that
    layout, allocate through it, and grow it further."""
    rng = Rng("qemugrow")
    size = 32 * MiB
    path = qemu_create(tmp_path / "g.qcow2", size, cluster_size=512, refcount_bits=64)
    src = tmp_path / "src"
    src.write_bytes(rng.randbytes(6 * MiB))
    qemu_io(path, f"write -q -s {src} 0 {6 * MiB}")
    assert header(path)["refcount_table_clusters"] > 1, "fixture: qemu did not grow it"
    expected = bytearray(qemu_raw(path))
    rt0 = header(path)["refcount_table_clusters"]
    with qcow2fast.open(path, "r+") as img:
        for i in range(12):
            b = rng.randbytes(MiB - 1000)
            off = 8 * MiB + i * 2 * MiB + 333
            img.write(off, b)
            expected[off:off + len(b)] = b
        img.write(100, b"head")
        expected[100:104] = b"head"
    assert header(path)["refcount_table_clusters"] > rt0
    finish(path, bytes(expected))


