"""Extended L2 entries (subclusters) against qemu 7.2: images qemu writes
read byte-identical and map the same; images qcow2fast writes pass
qemu-img check and compare and map as qemu's do after the same operations;
malformed subcluster bitmaps are reported with their location."""

import json

import pytest

import qcow2fast
from tests.helpers.cli_util import run_cli
from qcow2fast.errors import CorruptImageError, InvalidArgumentError
from tests.helpers.qemu_util import (KiB, MiB, Rng, assert_bytes_equal, header, patch, qemu_check,
                                     qemu_create, qemu_img, qemu_io, qemu_map, qemu_raw, read_at)

pytestmark = pytest.mark.qemu

CLUSTERS = [16 * KiB, 64 * KiB, 2 * MiB]


def _ops(cs):
    """qemu-io commands: sub-cluster writes, zeroes and discards, at
    subcluster and unaligned offsets."""
    sc = cs // 32
    return [f"write -P 0x22 {sc} {sc}", f"write -P 0x33 {3 * sc + 100} {5 * sc}",
            f"write -z {cs + 2 * sc} {3 * sc}", f"write -P 0x44 {2 * cs + 7} {cs}",
            f"discard {4 * cs} {cs}", f"write -z {5 * cs} {cs}",
            f"write -P 0x55 {6 * cs - 3 * sc} {6 * sc + 1}", f"write -z -u {8 * cs} {sc}"]


def _apply(img, cmd):
    """A qemu-io command of _ops, through the qcow2fast API."""
    words = cmd.split()
    off, n = int(words[-2]), int(words[-1])
    if words[1] == "-P":
        img.write(off, bytes([int(words[2], 16)]) * n)
    elif words[0] == "discard":
        img.discard(off, n)
    else:
        img.write_zeroes(off, n, may_unmap="-u" in words)


def _base(tmp_path, size):
    base = qemu_create(tmp_path / "base.qcow2", size, cluster_size=64 * KiB)
    src = tmp_path / "base.src"
    src.write_bytes(Rng("sc-base").randbytes(size))
    qemu_io(base, f"write -s {src} 0 {size}")
    return base


@pytest.mark.parametrize("cs", CLUSTERS)
@pytest.mark.parametrize("backing", [False, True])
def test_qemu_and_qcow2fast_agree(tmp_path, cs, backing):
    size = 10 * cs
    kw = {}
    if backing:
        kw = dict(backing=_base(tmp_path, size), backing_fmt="qcow2")
    q = qemu_create(tmp_path / "q.qcow2", size, cluster_size=cs, extended_l2="on", **kw)
    qemu_io(q, *_ops(cs))
    expected = qemu_raw(q)
    with qcow2fast.open(q) as img:                      # qemu's image, read by us
        assert_bytes_equal(img.read(0, size), expected)
        exts = img.block_status()
    qmap = qemu_map(q)
    assert [(e["start"], e["length"], e["depth"], e.get("offset")) for e in qmap] == \
        [(e.offset, e.length, e.depth, e.host_offset) for e in exts]
    f = str(tmp_path / "f.qcow2")                       # the same operations, by us
    qcow2fast.create(f, size, cluster_size=cs, extended_l2=True,
                     backing_file=kw.get("backing"), backing_format=kw.get("backing_fmt"))
    with qcow2fast.open(f, "r+") as img:
        for cmd in _ops(cs):
            _apply(img, cmd)
    qemu_check(f)
    assert_bytes_equal(qemu_raw(f), expected)
    assert [{k: v for k, v in e.items() if k != "offset"} for e in qemu_map(f)] == \
        [{k: v for k, v in e.items() if k != "offset"} for e in qmap]


def test_small_write_copies_one_subcluster(tmp_path):
    """A 4 KiB write into a 2 MiB cluster over a backing file allocates and
    copies only its 64 KiB subcluster: the rest still reads from below."""
    cs, sc = 2 * MiB, 64 * KiB
    base = _base(tmp_path, 2 * cs)
    top = str(tmp_path / "top.qcow2")
    qcow2fast.create(top, 2 * cs, cluster_size=cs, extended_l2=True, backing_file=base,
                     backing_format="qcow2")
    with qcow2fast.open(top, "r+") as img:
        img.write(sc + 4096, b"x" * 4096)
        exts = [(e.offset, e.length, e.depth) for e in img.block_status(0, cs)]
    assert exts == [(0, sc, 1), (sc, sc, 0), (2 * sc, cs - 2 * sc, 1)]
    qemu_check(top)
    expected = bytearray(qemu_raw(base))
    expected[sc + 4096:sc + 8192] = b"x" * 4096
    assert_bytes_equal(qemu_raw(top), bytes(expected))


def test_compressed_and_snapshot_clusters_are_copied(tmp_path):
    """Writing part of a compressed cluster or of one shared with a snapshot
    copies the allocated subclusters it keeps; the snapshot is untouched."""
    cs = 64 * KiB
    p = qemu_create(tmp_path / "c.qcow2", 4 * cs, cluster_size=cs, extended_l2="on")
    qemu_io(p, f"write -c -P 0x61 0 {cs}", f"write -P 0x62 {cs} {cs // 2}")
    qemu_img("snapshot", "-c", "s", p)
    snap = qemu_raw(p)
    with qcow2fast.open(p, "r+") as img:
        img.write(100, b"y" * 10)                 # into the compressed cluster
        img.write(cs + 5000, b"z" * 3000)         # into the shared one
        img.write_zeroes(cs + 3 * (cs // 32), cs // 32)
    qemu_check(p)
    expected = bytearray(snap)
    expected[100:110] = b"y" * 10
    expected[cs + 5000:cs + 8000] = b"z" * 3000
    expected[cs + 3 * (cs // 32):cs + 4 * (cs // 32)] = bytes(cs // 32)
    assert_bytes_equal(qemu_raw(p), bytes(expected))
    assert_bytes_equal(qemu_raw(p, snapshot="s"), snap, "snapshot")


def test_cli_create_info_measure(capsys, tmp_path):
    p = str(tmp_path / "x.qcow2")
    status, out, _ = run_cli(capsys, "create", "-f", "qcow2", "-o",
                             "extended_l2=on,cluster_size=128k", p, "100M")
    assert status == 0 and "extended_l2=on" in out
    info = json.loads(run_cli(capsys, "info", "--output=json", p)[1])
    assert info["format-specific"]["data"]["extended-l2"] is True
    assert info == json.loads(qemu_img("info", "--output=json", p).stdout_text)
    argv = ["measure", "--output=json", "-O", "qcow2", "-o", "extended_l2=on", "--size", "10G"]
    assert json.loads(run_cli(capsys, *argv)[1]) == json.loads(qemu_img(*argv).stdout_text)
    with pytest.raises(InvalidArgumentError):
        qcow2fast.create(str(tmp_path / "y.qcow2"), MiB, cluster_size=8 * KiB, extended_l2=True)
    with pytest.raises(InvalidArgumentError):
        qcow2fast.create(str(tmp_path / "z.qcow2"), MiB, compat="0.10", extended_l2=True)


def _l2_entry(path, index):
    h = header(path)
    (l1e,) = read_at(path, h["l1_table_offset"], ">Q")
    return (l1e & 0x00FFFFFFFFFFFE00) + 16 * index


@pytest.mark.parametrize("damage", ["both", "no_host", "compressed_bitmap"])
def test_malformed_bitmaps_are_corruption(capsys, tmp_path, damage):
    cs = 64 * KiB
    p = qemu_create(tmp_path / "m.qcow2", 4 * cs, cluster_size=cs, extended_l2="on")
    qemu_io(p, f"write -c -P 1 0 {cs}", f"write -P 2 {cs} 8k")
    index, value = {"both": (1, 0x1_0000_0001 | 0xF), "no_host": (2, 0x3),
                    "compressed_bitmap": (0, 0x1)}[damage]
    where = _l2_entry(p, index) + 8
    patch(p, where, ">Q", value)
    with qcow2fast.open(p) as img:
        with pytest.raises(CorruptImageError) as e:
            img.read(index * cs, 512)
    assert e.value.offset == where - 8 and "subcluster bitmap" in str(e.value)
    q_status = qemu_img("check", p, check=False).returncode
    status, _, err = run_cli(capsys, "check", p)
    assert status == q_status == 2
    assert "subcluster allocation" in err
