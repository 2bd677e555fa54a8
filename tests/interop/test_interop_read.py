"""Images made by qemu must read bit-exactly through qcow2fast.

For every image: ``qcow2fast.open(path).read(0, size)`` equals qemu's raw
conversion byte for byte, random unaligned reads equal the matching slices,
and ``block_status`` covers the image contiguously and agrees with
``qemu-img map --output=json`` on which ranges read data (and from which
layer, at which host offset) and which read as zero / unallocated.
"""

import json
import os
import shutil

import pytest

import qcow2fast
from qcow2fast.errors import InvalidArgumentError
from tests.helpers.qemu_util import (CLUSTER_SIZES, GEOMETRIES, INCOMPAT_DIRTY, KiB, MiB, Rng,
                                     assert_block_status_matches_qemu, assert_bytes_equal,
                                     assert_extents_contiguous, compressible_bytes, file_state,
                                     geom_id, header, is_dirty, qemu_check, qemu_create, qemu_img,
                                     qemu_info, qemu_io, qemu_map, qemu_raw)

pytestmark = pytest.mark.qemu


class QemuWrites:
    """Collects qemu-io commands (data from random source files) and runs them."""

    def __init__(self, path, tmp, rng, fmt="qcow2"):
        self.path, self.tmp, self.rng, self.fmt = str(path), tmp, rng, fmt
        self.cmds = []
        self.n = 0

    def _src(self, data):
        self.n += 1
        src = os.path.join(str(self.tmp), f"src-{os.path.basename(self.path)}-{self.n}")
        with open(src, "wb") as f:
            f.write(data)
        return src

    def data(self, off, n, compressible=False):
        data = compressible_bytes(self.rng, n) if compressible else self.rng.randbytes(n)
        self.cmds.append(f"write -q -s {self._src(data)} {off} {n}")

    def pattern(self, off, n, pat):
        self.cmds.append(f"write -q -P {pat:#x} {off} {n}")

    def compressed(self, off, n):
        self.cmds.append(f"write -q -c -s {self._src(compressible_bytes(self.rng, n))} {off} {n}")

    def zero(self, off, n, unmap=False):
        self.cmds.append(f"write -q -z {'-u ' if unmap else ''}{off} {n}")

    def discard(self, off, n):
        self.cmds.append(f"discard -q {off} {n}")

    def run(self, *extra_cmds, check=True):
        p = qemu_io(self.path, *self.cmds, *extra_cmds, fmt=self.fmt, check=check)
        self.cmds = []
        return p


def image_size(cs):
    return max(4 * MiB, 14 * cs)


def basic_writes(w, cs, size, rb):
    """A mix of full/partial/unaligned data, compressed, zero and discard ops.

    Cluster indices used (size >= 14 clusters): 0-1 data, 2-3 unaligned data,
    4 compressed, 5-6 data then zero over 5, 7 discarded, 8 zeroed+unmapped,
    a pattern in the middle, size-2cs zero over unallocated, the last 4 KiB.
    """
    w.data(0, cs + 512)                          # full cluster + head of the next
    w.data(3 * cs - 200, 400)                    # unaligned, across a cluster boundary
    if rb > 1:
        w.compressed(4 * cs, cs)                 # one compressed cluster
    else:
        # qemu 7.2 fails compressed writes with refcount_bits=1 (EIO) once
        # other clusters are allocated: its byte allocator needs refcount 2.
        w.data(4 * cs, cs)
    w.data(5 * cs, 2 * cs)
    w.zero(5 * cs, cs)                           # zero over allocated (keeps allocation)
    w.data(7 * cs, cs)
    w.discard(7 * cs, cs)                        # discard an allocated cluster
    w.data(8 * cs, cs)
    w.zero(8 * cs, cs, unmap=True)               # zero + unmap
    mid = size // 2 if size >= 24 * cs else 9 * cs
    w.pattern(mid + 333, cs + 100, 0x33)         # unaligned, crossing clusters
    w.zero(size - 2 * cs, cs)                    # zero over unallocated
    w.data(size - 4096, 4096)                    # the last bytes of the image
    w.data(cs + 100, 50)                         # small overwrite in an allocated cluster
    w.zero(100, 300)                             # unaligned zero inside a data cluster
    l2_span = cs * (cs // 8)
    if l2_span + 2000 < size // 2:               # across an L2 table boundary
        w.data(l2_span - 1000, 3000)
    w.run()


def check_against_qemu(path, *, chain_len=1, rng=None, expect_dirty=None):
    """The whole qcow2fast-vs-qemu comparison for one image (opened read-only)."""
    path = str(path)
    rng = rng or Rng(path)
    ref = qemu_raw(path)
    info = qemu_info(path)
    qmap = qemu_map(path)
    before = file_state(path)
    with qcow2fast.open(path) as img:
        size = img.size
        assert size == info["virtual-size"] == len(ref)
        assert img.cluster_size == info["cluster-size"]
        fs = info["format-specific"]["data"]
        assert img.version == (3 if fs["compat"] == "1.1" else 2)
        assert img.refcount_bits == fs["refcount-bits"]
        assert img.compression_type == fs.get("compression-type", "zlib")
        assert img.lazy_refcounts == fs.get("lazy-refcounts", False)
        assert img.read_only
        if expect_dirty is not None:
            assert img.dirty == expect_dirty

        assert_bytes_equal(img.read(0, size), ref, f"qcow2fast read of {path}")

        # Random unaligned reads, some crossing many clusters.
        cs = img.cluster_size
        for i in range(60):
            off, n = rng.span(size, rng.choice((1, 511, 4097, 3 * cs + 17, 5 * cs)))
            got = img.read(off, n)
            assert got == ref[off:off + n], f"read({off:#x}, {n}) differs"
        buf = bytearray(3 * cs + 5)
        off = rng.randrange(0, size - len(buf))
        assert img.readinto(off, buf) == len(buf)
        assert buf == ref[off:off + len(buf)]

        extents = img.block_status()
        assert_block_status_matches_qemu(extents, qmap, size, chain_len)

        # A window must be covered exactly and agree with the full map.
        off, n = rng.span(size, 7 * cs + 3)
        window = img.block_status(off, n)
        assert_extents_contiguous(window, off, n, chain_len)
        full_kind = {}
        for e in extents:
            full_kind[(e.offset, e.offset + e.length)] = e.kind
        for w in window:
            for (a, b), k in full_kind.items():
                if a <= w.offset < b:
                    same = (k in ("data", "compressed")) == (w.kind in ("data", "compressed"))
                    assert same, f"windowed block_status {w} disagrees with full map {k}"
    assert file_state(path) == before, "a read-only open modified the image file"
    return ref


# ------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("geom", GEOMETRIES, ids=geom_id)
def test_basic_matrix(tmp_path, geom):
    cs, rb, compat = geom
    size = image_size(cs)
    path = qemu_create(tmp_path / "img.qcow2", size, cluster_size=cs, refcount_bits=rb,
                       compat=compat)
    rng = Rng(f"basic-{geom}")
    basic_writes(QemuWrites(path, tmp_path, rng), cs, size, rb)
    qemu_check(path)
    ref = check_against_qemu(path, rng=rng, expect_dirty=False)
    assert ref.count(0) < len(ref), "scenario wrote nothing?"


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
@pytest.mark.parametrize("ctype,compat", [("zlib", "0.10"), ("zlib", "1.1"), ("zstd", "1.1")])
def test_compressed_convert(tmp_path, cs, ctype, compat):
    """qemu-img convert -c, then qemu overwrites parts of compressed clusters."""
    rng = Rng(f"compressed-{cs}-{ctype}-{compat}")
    nclusters = max(24, (4 * MiB) // cs) if cs < 2 * MiB else 6
    size = nclusters * cs
    raw = bytearray(size)
    kinds = ("random", "text", "zero", "pattern", "text")
    for i in range(nclusters):
        k = kinds[i % len(kinds)] if cs >= 4096 else rng.choice(kinds)
        if k == "random":
            raw[i * cs:(i + 1) * cs] = rng.randbytes(cs)
        elif k == "text":
            raw[i * cs:(i + 1) * cs] = compressible_bytes(rng, cs)
        elif k == "pattern":
            raw[i * cs:(i + 1) * cs] = bytes([i & 0xFF]) * cs
    if 4096 <= cs < 2 * MiB:
        raw += compressible_bytes(rng, 1536)     # a last cluster that is not whole
        size += 1536
    raw_path = tmp_path / "src.raw"
    raw_path.write_bytes(bytes(raw))
    path = str(tmp_path / "c.qcow2")
    opts = f"cluster_size={cs},compat={compat}"
    if compat == "1.1":
        opts += f",compression_type={ctype}"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, str(raw_path), path)
    info = qemu_info(path)
    assert info["format-specific"]["data"].get("compression-type", "zlib") == ctype
    assert any(q["data"] and "offset" not in q for q in qemu_map(path)), "nothing compressed?"
    assert qemu_raw(path) == bytes(raw)
    check_against_qemu(path, rng=rng)

    # Partial overwrites of compressed clusters (qemu does the COW).
    w = QemuWrites(path, tmp_path, rng)
    w.data(cs + 17, 100)
    w.data(3 * cs - 5, 10)
    w.zero(4 * cs + 512, 512)
    w.run()
    qemu_check(path)
    check_against_qemu(path, rng=rng)


SNAPSHOT_GEOMS = [(cs, rb, "1.1") for cs in CLUSTER_SIZES for rb in (2, 16, 64)] + \
                 [(cs, 16, "0.10") for cs in CLUSTER_SIZES]


@pytest.mark.parametrize("geom", SNAPSHOT_GEOMS, ids=geom_id)
def test_internal_snapshots(tmp_path, geom):
    cs, rb, compat = geom
    size = image_size(cs)
    path = qemu_create(tmp_path / "s.qcow2", size, cluster_size=cs, refcount_bits=rb,
                       compat=compat)
    rng = Rng(f"snap-{geom}")
    w = QemuWrites(path, tmp_path, rng)
    w.data(0, 4 * cs)
    w.data(size // 2, 3 * cs + 1000)
    w.run()
    qemu_img("snapshot", "-c", "s1", path)
    w.data(cs + 300, cs)                  # partial overwrite of shared clusters (COW)
    w.zero(2 * cs, cs)
    w.discard(3 * cs, cs)
    w.data(6 * cs, cs)
    w.run()
    qemu_img("snapshot", "-c", "s2", path)
    w.data(100, 200)
    w.compressed(size - 3 * cs, cs)              # must be unallocated for qemu
    w.zero(size // 2, cs, unmap=True)
    w.run()
    if rb == 16:
        qemu_img("snapshot", "-d", "s1", path)
    qemu_check(path)
    info = qemu_info(path)
    assert len(info.get("snapshots", [])) == (1 if rb == 16 else 2)
    check_against_qemu(path, rng=rng)
    with qcow2fast.open(path) as img:
        assert img.read(0, size) == qemu_raw(path)
    for s in info.get("snapshots", []):           # each snapshot's view, read-only
        with qcow2fast.open(path, snapshot=s["name"]) as img:
            assert img.snapshot.id == s["id"]
            assert img.read(0, size) == qemu_raw(path, snapshot=s["name"])
        with pytest.raises(InvalidArgumentError):
            qcow2fast.open(path, "r+", snapshot=s["name"])


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_backing_chain_depth3(tmp_path, cs, compat):
    """base <- mid <- top, different cluster sizes per layer, base shorter than top."""
    rng = Rng(f"chain-{cs}-{compat}")
    size = image_size(cs)
    base_cs = {512: 65536, 4096: 512, 65536: 4096, 2 * MiB: 65536}[cs]
    mid_cs = {512: 4096, 4096: 65536, 65536: 512, 2 * MiB: 2 * MiB}[cs]
    base_size = (size * 3 // 4) // base_cs * base_cs
    base = qemu_create(tmp_path / "base.qcow2", base_size, cluster_size=base_cs, compat=compat)
    # Relative backing names: resolved relative to the overlay's directory.
    mid = qemu_create(tmp_path / "mid.qcow2", size, cluster_size=mid_cs, compat=compat,
                      backing="base.qcow2")
    top = qemu_create(tmp_path / "top.qcow2", size, cluster_size=cs, compat=compat,
                      backing="mid.qcow2")

    w = QemuWrites(base, tmp_path, rng)
    w.compressed(0, base_cs)              # first: qemu compresses only unallocated clusters
    w.compressed(base_size - base_cs, base_cs)
    for i in range(8):
        w.data(i * base_size // 8 + 1234, base_size // 16)
    w.run()
    w = QemuWrites(mid, tmp_path, rng)
    w.data(base_size // 8, base_size // 32 + 777)
    w.zero(0, max(mid_cs, 4096))                 # hides base data
    w.discard(3 * base_size // 8, 2 * mid_cs)
    w.data(size - 3 * mid_cs, 2 * mid_cs)        # beyond the end of base
    w.run()
    w = QemuWrites(top, tmp_path, rng)
    w.data(base_size // 8 + 5, 300)               # COW from mid
    w.data(2 * base_size // 8 + 5, cs + 300)      # COW from base
    w.zero(5 * base_size // 8 + 1234, cs)         # hides base data
    w.discard(6 * base_size // 8, 2 * cs)
    w.data(size - 1000, 1000)
    w.run()
    for p in (base, mid, top):
        qemu_check(p)

    check_against_qemu(mid, chain_len=2, rng=rng)
    check_against_qemu(top, chain_len=3, rng=rng)
    with qcow2fast.open(top) as img:
        chain = img.backing_chain
        assert len(chain) == 3
        for got, want in zip(chain, (top, mid, base)):
            assert os.path.samefile(got, want)
        assert img.backing_file == "mid.qcow2"
        assert img.backing_format == "qcow2"
        assert img.backing is not None and img.backing.backing is not None
        assert img.backing.backing.backing is None


def test_backing_chain_raw_base(tmp_path):
    rng = Rng("rawbase")
    size = 4 * MiB
    base = tmp_path / "base.raw"
    base.write_bytes(rng.randbytes(3 * MiB))        # fully written: no holes
    mid = qemu_create(tmp_path / "mid.qcow2", size, cluster_size=4096,
                      backing=str(base), backing_fmt="raw")
    top = qemu_create(tmp_path / "top.qcow2", size, cluster_size=65536,
                      backing=str(mid), backing_fmt="qcow2")
    w = QemuWrites(mid, tmp_path, rng)
    w.data(100000, 5000)
    w.zero(MiB, 64 * KiB)
    w.run()
    w = QemuWrites(top, tmp_path, rng)
    w.data(2 * MiB + 3, 70000)
    w.run()
    check_against_qemu(top, chain_len=3, rng=rng)


def test_open_without_backing(tmp_path):
    """backing=False: unallocated clusters read as zero, extents are unallocated."""
    rng = Rng("nobacking")
    base = qemu_create(tmp_path / "base.qcow2", 4 * MiB)
    top = qemu_create(tmp_path / "top.qcow2", 4 * MiB, backing="base.qcow2")
    w = QemuWrites(base, tmp_path, rng)
    w.data(0, 4 * MiB)
    w.run()
    w = QemuWrites(top, tmp_path, rng)
    w.data(MiB + 7, 3000)
    w.run()
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": str(top)}})
    out = tmp_path / "nobacking.raw"
    qemu_img("convert", "-O", "raw", "json:" + spec, str(out))
    ref = out.read_bytes()
    with qcow2fast.open(str(top), backing=False) as img:
        assert img.backing is None
        assert img.read(0, img.size) == ref
        ext = img.block_status()
        assert_extents_contiguous(ext, 0, img.size, 1)
        data = [e for e in ext if e.kind in ("data", "compressed")]
        assert all(e.depth == 0 for e in data)
        assert sum(e.length for e in data) < img.size


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
@pytest.mark.parametrize("rb", [1, 16, 64])
def test_lazy_refcounts_left_dirty(tmp_path, cs, rb):
    """qemu-io killed with SIGKILL after writes: dirty bit set, refcounts stale."""
    rng = Rng(f"lazy-{cs}-{rb}")
    size = image_size(cs)
    path = qemu_create(tmp_path / "l.qcow2", size, cluster_size=cs, refcount_bits=rb,
                       lazy_refcounts="on")
    w = QemuWrites(path, tmp_path, rng)
    w.data(0, 2 * cs + 100)
    w.data(size // 2 + 5, cs)
    w.zero(5 * cs, cs)
    w.data(size - 600, 600)
    p = w.run("flush", "sigraise 9", check=False)
    assert p.returncode in (-9, 137), p.stderr_text
    assert is_dirty(path), "qemu did not leave the image dirty"
    # The on-disk refcounts are stale: qemu's check (without -r) sees it.
    assert qemu_check(path, expect_clean=False)["exit_code"] != 0
    check_against_qemu(path, rng=rng, expect_dirty=True)
    assert is_dirty(path), "a read-only open must not repair (write) the image"


def test_large_l1_many_l2_tables(tmp_path):
    """512-byte clusters, 64 MiB: 2048 L2 tables, writes scattered over all of them."""
    rng = Rng("manyl2")
    size = 64 * MiB
    path = qemu_create(tmp_path / "big.qcow2", size, cluster_size=512)
    w = QemuWrites(path, tmp_path, rng)
    for i in range(0, size - 8192, size // 97):
        w.data(i + rng.randrange(0, 4096), rng.randrange(1, 3000))
    w.run()
    check_against_qemu(path, rng=rng)


@pytest.mark.parametrize("cs,size", [(512, 16 << 30), (65536, 2 << 40), (2 * MiB, 8 << 40)])
def test_large_virtual_offsets(tmp_path, cs, size):
    """qemu writes past 2**32 / 2**40; qcow2fast reads them and maps them right."""
    path = qemu_create(tmp_path / "big.qcow2", size, cluster_size=cs)
    spots = [o for o in ((1 << 31) - 3, (1 << 32) - 700, (3 << 32) + 12345,
                         (1 << 40) + 99, size - 5000) if o + 5000 <= size]
    cmds = [f"write -q -c -P 0x3f {size - 16 * cs} {cs}"]
    cmds += [f"write -q -P {0x40 + i} {o} 3000" for i, o in enumerate(spots)]
    qemu_io(path, *cmds)
    with qcow2fast.open(path) as img:
        for i, o in enumerate(spots):
            assert img.read(o - 10, 3020) == bytes(10) + bytes([0x40 + i]) * 3000 + bytes(10)
        assert img.read(size - 16 * cs, cs) == b"\x3f" * cs
        extents = img.block_status()
    assert_block_status_matches_qemu(extents, qemu_map(path), size, 1)


def test_header_v3_fields_sanity(tmp_path):
    """Sanity of the test helpers themselves (header parsing) on a qemu image."""
    path = qemu_create(tmp_path / "h.qcow2", 4 * MiB, cluster_size=4096, refcount_bits=8)
    h = header(path)
    assert h["magic"] == b"QFI\xfb" and h["version"] == 3
    assert h["cluster_bits"] == 12 and h["refcount_order"] == 3
    assert h["incompatible_features"] & INCOMPAT_DIRTY == 0
    shutil.copy(path, tmp_path / "copy.qcow2")
    with qcow2fast.open(str(tmp_path / "copy.qcow2")) as img:
        assert img.read(0, 4 * MiB) == bytes(4 * MiB)
        assert {e.kind for e in img.block_status()} == {"unallocated"}
