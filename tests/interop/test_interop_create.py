"""Images qcow2fast creates must satisfy qemu: ``qemu-img info`` reports
what was asked, ``qemu-img check`` is clean, and the content (backing
files, preallocation, odd sizes) reads in qemu as expected."""

import os

import pytest

import qcow2fast
from tests.helpers.write_util import finish, image_size, make_backing, qf_create, scenario
from tests.helpers.qemu_util import (GEOMETRIES, MiB, Rng, assert_qemu_content, geom_id, header,
                                     qemu_check, qemu_create, qemu_info, qemu_io, qemu_map,
                                     qemu_raw)

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("geom", GEOMETRIES, ids=geom_id)
def test_create_matches_qemu_info(tmp_path, geom):
    cs, rb, compat = geom
    size = image_size(cs) + 3 * 512          # not a whole number of clusters
    path = qf_create(tmp_path / "n.qcow2", size, cluster_size=cs, refcount_bits=rb,
                     compat=compat)
    info = qemu_info(path)
    fs = info["format-specific"]["data"]
    assert info["virtual-size"] == size
    assert info["cluster-size"] == cs
    assert fs["compat"] == compat
    assert fs["refcount-bits"] == rb
    assert fs.get("lazy-refcounts", False) is False
    assert fs.get("compression-type", "zlib") == "zlib"
    assert "backing-filename" not in info
    qemu_check(path)
    assert qemu_raw(path) == bytes(size)
    h = header(path)
    assert h["version"] == (3 if compat == "1.1" else 2)
    assert h["incompatible_features"] == 0


@pytest.mark.parametrize("opts,key,value", [
    ({"lazy_refcounts": True}, "lazy-refcounts", True),
    ({"compression_type": "zstd"}, "compression-type", "zstd"),
    ({"compression_type": "zlib"}, "compression-type", "zlib"),
])
def test_create_options(tmp_path, opts, key, value):
    path = qf_create(tmp_path / "o.qcow2", 4 * MiB, **opts)
    assert qemu_info(path)["format-specific"]["data"][key] == value
    qemu_check(path)
    with qcow2fast.open(path) as img:
        for k, v in opts.items():
            assert getattr(img, k) == v


def test_create_v2_rejects_non16_refcounts(tmp_path):
    with pytest.raises(qcow2fast.errors.InvalidArgumentError):
        qcow2fast.create(str(tmp_path / "x.qcow2"), MiB, compat="0.10", refcount_bits=8)


@pytest.mark.parametrize("bad", [
    {"cluster_size": 256}, {"cluster_size": 4 * MiB}, {"cluster_size": 3000},
    {"refcount_bits": 3}, {"refcount_bits": 128}, {"compat": "2.0"},
    {"compression_type": "lzma"}, {"preallocation": "bogus"},
])
def test_create_invalid_options(tmp_path, bad):
    with pytest.raises(qcow2fast.errors.InvalidArgumentError):
        qcow2fast.create(str(tmp_path / "x.qcow2"), MiB, **bad)


def test_create_size_from_backing(tmp_path):
    rng = Rng("sizefrombacking")
    base, fmt, content = make_backing(tmp_path, "qemu", 3 * MiB, rng)
    top = qf_create(tmp_path / "top.qcow2", None, backing_file=base, backing_format="qcow2")
    assert qemu_info(top)["virtual-size"] == 3 * MiB
    with qcow2fast.open(top) as img:
        assert img.size == 3 * MiB
    qemu_check(top)
    assert qemu_raw(top) == content


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("cs", [512, 65536, 2 * MiB])
def test_preallocation(tmp_path, prealloc, cs):
    size = 4 * MiB + (0 if cs == 2 * MiB else 512 * 3)
    path = qf_create(tmp_path / "p.qcow2", size, cluster_size=cs, preallocation=prealloc)
    qemu_check(path)
    assert qemu_raw(path) == bytes(size)
    for q in qemu_map(path):
        assert "offset" in q, f"preallocation={prealloc}: unallocated range {q}"
    st = os.stat(path)
    assert st.st_size >= size
    if prealloc in ("falloc", "full"):
        assert st.st_blocks * 512 >= size, "data clusters not allocated in the file"
    with qcow2fast.open(path) as img:
        assert all(e.kind in ("data", "zero") for e in img.block_status())
    rng = Rng(f"prealloc-{prealloc}-{cs}")
    data = scenario(path, rng, ops=30)
    finish(path, data)


@pytest.mark.parametrize("size", [1000, 513, 0])
def test_create_odd_sizes(tmp_path, size):
    """Sizes that are not whole sectors: rejected, or rounded up as qemu does."""
    path = str(tmp_path / "odd.qcow2")
    try:
        qcow2fast.create(path, size)
    except qcow2fast.errors.InvalidArgumentError:
        return
    info = qemu_info(path)
    assert info["virtual-size"] == -(-size // 512) * 512
    qemu_check(path)
    with qcow2fast.open(path, "r+") as img:
        assert img.size == info["virtual-size"]
        if img.size:
            img.write(img.size - 1, b"\x01")
            assert img.read(img.size - 2, 2) == b"\x00\x01"
        else:
            assert img.read(0, 0) == b""
    qemu_check(path)


def test_long_backing_name_with_512_byte_clusters(tmp_path):
    """Header + extensions + backing name must fit in cluster 0 (512 bytes
    here): qemu drops the optional feature-name table to make room, and so
    must qcow2fast; a name that cannot fit at all is an error, not a bad file.
    (Found by the property test: a long tmp path failed with 512-byte clusters.)"""
    d = tmp_path / ("d" * 150) / ("e" * 50)
    d.mkdir(parents=True)
    base = qemu_create(d / "base.qcow2", MiB)
    qemu_io(base, "write -q -P 0x71 0 4096")
    assert 200 < len(base) < 300
    top = qf_create(d / "top.qcow2", None, cluster_size=512, backing_file=base,
                    backing_format="qcow2")
    info = qemu_info(top)
    assert info["backing-filename"] == base
    assert info["backing-filename-format"] == "qcow2"
    qemu_check(top)
    with qcow2fast.open(top, "r+") as img:
        img.write(2048, b"x" * 100)
    qemu_check(top)
    expected = bytearray(MiB)
    expected[:4096] = b"\x71" * 4096
    expected[2048:2148] = b"x" * 100
    assert_qemu_content(top, bytes(expected))

    far = d / ("f" * 200)
    far.mkdir()
    base2 = qemu_create(far / "base.qcow2", MiB)
    assert len(base2) > 420
    with pytest.raises(qcow2fast.errors.Qcow2Error):
        qcow2fast.create(str(far / "top.qcow2"), None, cluster_size=512, backing_file=base2,
                         backing_format="qcow2")
