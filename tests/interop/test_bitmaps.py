"""Persistent dirty bitmaps against qemu 7.2, both ways: bitmaps qemu made
and filled read by qcow2fast as qemu-nbd exports them; bitmaps qcow2fast
made and filled read by qemu (qemu-img info, qemu-nbd -B + nbdinfo) with
the extents the writes imply; check and its repairs keep every cluster
the bitmaps use (the data-loss bug of issue 21)."""

import json
import shutil

import pytest

import qcow2fast
from qcow2fast.engine.bitmap_list import read_table
from qcow2fast.errors import InvalidArgumentError
from qcow2fast.spec.bitmaps import table_offsets
from tests.helpers.bitmap_util import expected_extents, merge_runs, qemu_dirty_map
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import (H_AUTOCLEAR, H_INCOMPATIBLE, header, patch, qemu_check,
                                     qemu_create, qemu_img, qemu_info, qemu_io, qemu_raw,
                                     read_extensions)

pytestmark = pytest.mark.qemu
KiB, MiB = 1024, 1 << 20
SIZE = 64 * MiB
EXT_BITMAPS = 0x23852875


def qemu_bitmaps(path):
    return qemu_info(path)["format-specific"]["data"].get("bitmaps", [])


def qemu_made(tmp_path, name="q.qcow2", **opts):
    """An image qemu filled, with bitmaps of several granularities (one
    disabled before the last writes)."""
    path = qemu_create(tmp_path / name, SIZE, **opts)
    qemu_io(path, "write -P 1 0 1M")
    qemu_img("bitmap", "--add", path, "b64k")
    qemu_img("bitmap", "--add", "-g", "512", path, "b512")
    qemu_img("bitmap", "--add", "-g", "1G", path, "b1g")
    qemu_img("bitmap", "--add", "-g", "4096", path, "off")
    qemu_io(path, "write -P 2 4M 64k", "write -P 3 9000000 5000", "write -z 20M 3M",
            "discard 40M 1M")
    qemu_img("bitmap", "--disable", path, "off")
    qemu_io(path, "write -P 4 50M 700")
    return path


def maps(path, names, tmp_path):
    return {n: merge_runs(qemu_dirty_map(path, n, tmp_path)) for n in names}


NAMES = ("b64k", "b512", "b1g", "off")


def test_qemu_bitmaps_read_as_qemu_nbd_exports_them(tmp_path):
    path = qemu_made(tmp_path)
    want = maps(path, NAMES, tmp_path)
    assert want["b64k"] != [(0, SIZE, False)]
    with qcow2fast.open(path) as img:
        assert [(b.name, b.granularity, b.flags) for b in img.bitmaps] == \
            [(b["name"], b["granularity"], b["flags"]) for b in qemu_bitmaps(path)]
        for n in NAMES:
            assert merge_runs(img.dirty_extents(n)) == want[n], n
        # a window of the disk: the extents covering exactly that range
        ext = img.dirty_extents("b512", 8 * MiB, 2 * MiB)
        assert ext[0][0] == 8 * MiB and sum(e[1] for e in ext) == 2 * MiB
        assert [e for e in ext if e[2]] == [e for e in want["b512"] if e[2]
                                            and 8 * MiB <= e[0] < 10 * MiB]


def test_check_counts_bitmap_clusters_and_repairs_keep_them(tmp_path, capsys):
    """The data-loss bug: check called the bitmap directory, tables and data
    leaked, and -r leaks freed them (qemu-img check then found
    'ERROR cluster N refcount=0 reference=1')."""
    path = qemu_made(tmp_path)
    want = maps(path, NAMES, tmp_path)
    q = qemu_check(path)
    status, out, _ = run_cli(capsys, "check", "--output=json", path)
    assert (status, json.loads(out)) == (q["exit_code"], {k: v for k, v in q.items()
                                                          if k != "exit_code"})
    for mode in ("leaks", "all"):
        copy = str(tmp_path / f"{mode}.qcow2")
        shutil.copy(path, copy)
        status, _, err = run_cli(capsys, "check", "-r", mode, copy)
        assert status == 0, err
        qemu_check(copy)
        assert maps(copy, NAMES, tmp_path) == want
        assert qemu_raw(copy) == qemu_raw(path)


def test_refcount_rebuild_counts_bitmap_clusters(tmp_path, capsys):
    """A dirty lazy-refcounts image is rebuilt at open for writing; the
    rebuild must count the bitmaps' clusters (else they are handed out)."""
    path = qemu_made(tmp_path, lazy_refcounts="on")
    want = maps(path, NAMES, tmp_path)
    patch(path, H_INCOMPATIBLE, ">Q", header(path)["incompatible_features"] | 1)
    with qcow2fast.open(path, "r+") as img:
        assert not img.dirty
        img.write(60 * MiB, b"x" * 100000)          # allocates: must not reuse bitmap clusters
    qemu_check(path)
    got = maps(path, NAMES, tmp_path)
    for n in ("b64k", "b512"):
        assert got[n] != want[n]                    # the new write is in the enabled ones
    assert got["off"] == want["off"]
    # the same through check -r all on a dirty image
    patch(path, H_INCOMPATIBLE, ">Q", header(path)["incompatible_features"] | 1)
    status, _, err = run_cli(capsys, "check", "-r", "all", path)
    assert status == 0, err
    qemu_check(path)
    assert maps(path, NAMES, tmp_path) == got


@pytest.mark.parametrize("cluster_size", [512, 65536, 2 * MiB])
def test_qcow2fast_bitmaps_read_by_qemu(tmp_path, cluster_size):
    """Bitmaps qcow2fast adds and fills through every write path: qemu-img
    info lists them, qemu-nbd exports the extents the writes imply."""
    path = qemu_create(tmp_path / "f.qcow2", SIZE, cluster_size=cluster_size)
    grans = {"g64k": 65536, "g512": 512, "g2m": 2 * MiB, "dis": 65536, "late": 4096}
    writes = {n: [] for n in grans}
    cs = cluster_size

    def did(off, n, names):
        for k in names:
            writes[k].append((off, n))

    with qcow2fast.open(path, "r+") as img:
        for n, g in grans.items():
            if n != "late":
                img.add_bitmap(n, g, disabled=n == "dis")
        on = ["g64k", "g512", "g2m"]
        img.write(12345, b"a" * 70000)
        did(12345, 70000, on)
        img.write_zeroes(5 * MiB, 3 * MiB + 17)
        did(5 * MiB, 3 * MiB + 17, on)
        img.add_bitmap("late", 4096)
        on.append("late")
        img.discard(10 * MiB, 4 * MiB)
        did(10 * MiB, 4 * MiB, on)
        img.write_compressed(16 * MiB, b"c" * cs)
        did(16 * MiB, cs, on)
        img.writev([(30 * MiB + 1, b"v" * 10), (31 * MiB, b"w" * 4096)])
        did(30 * MiB + 1, 10, on)
        did(31 * MiB, 4096, on)
        img.disable_bitmap("g2m")
        img.write(SIZE - 100, b"e" * 100)
        did(SIZE - 100, 100, [k for k in on if k != "g2m"])
    qemu_check(path)
    info = qemu_bitmaps(path)
    assert [(b["name"], b["granularity"], b["flags"]) for b in info] == \
        [(n, g, [] if n in ("dis", "g2m") else ["auto"]) for n, g in grans.items()]
    for n, g in grans.items():
        want = expected_extents(SIZE, g, writes[n])
        assert merge_runs(qemu_dirty_map(path, n, tmp_path)) == want, n
    with qcow2fast.open(path) as img:
        for n, g in grans.items():
            assert merge_runs(img.dirty_extents(n)) == \
                expected_extents(SIZE, g, writes[n]), n


def test_operations_and_convert_n_and_nbd_mark_bitmaps(tmp_path):
    """clear, enable, merge (within the image and from another), remove;
    writes through ``convert -n`` and through the NBD server are marked."""
    from tests.helpers.nbd_util import nbdcopy, served
    path = qemu_create(tmp_path / "o.qcow2", SIZE)
    other = qemu_made(tmp_path, "other.qcow2")
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        f.truncate(SIZE)
        f.seek(3 * MiB)
        f.write(b"s" * 70000)
    with qcow2fast.open(path, "r+") as img:
        img.add_bitmap("a")
        img.add_bitmap("b", 512, disabled=True)
        img.write(0, b"x")
        img.clear_bitmap("a")
        img.write(MiB, b"y")
        img.enable_bitmap("b")
        img.write(2 * MiB, b"z")
        img.merge_bitmap("a", "b")
        with qcow2fast.open(other) as o:
            img.merge_bitmap("b64k", "a", source_image=o)
        with pytest.raises(InvalidArgumentError, match="not found"):
            img.merge_bitmap("nope", "a")
        img.add_bitmap("gone")
        img.remove_bitmap("gone")
    want_a = qemu_dirty_map(other, "b64k", tmp_path)
    assert [n["name"] for n in qemu_bitmaps(path)] == ["a", "b"]
    got_a = merge_runs(qemu_dirty_map(path, "a", tmp_path))
    assert got_a == merge_runs(expected_extents(SIZE, 65536, [(MiB, 1), (2 * MiB, 1)] + [
        (o, n) for o, n, d in want_a if d]))
    assert merge_runs(qemu_dirty_map(path, "b", tmp_path)) == \
        expected_extents(SIZE, 512, [(MiB, 65536), (2 * MiB, 65536)])  # a's granules
    # convert -n: whatever it writes (data, and zeros over the rest) is marked
    qemu_img("bitmap", "--clear", path, "a")
    qcow2fast.convert(src, path, source_format="raw", existing=True)
    got = merge_runs(qemu_dirty_map(path, "a", tmp_path))
    assert all(d for o, n, d in got if o < 3 * MiB + 70000 and o + n > 3 * MiB), got
    with qcow2fast.open(path) as img:
        assert merge_runs(img.dirty_extents("a")) == got
    # NBD: nbdcopy writes the 70000-byte source at offset 0 of the export
    qemu_img("bitmap", "--clear", path, "a")
    small = str(tmp_path / "small.raw")
    with open(small, "wb") as f:
        f.write(b"n" * 70000)
    with qcow2fast.open(path, "r+") as img, served(img, tmp_path) as (_, uri):
        nbdcopy(small, uri)
    got = merge_runs(qemu_dirty_map(path, "a", tmp_path))
    assert got[0] == (0, 131072, True), got
    qemu_check(path)


def test_bitmap_in_use_after_a_crash(tmp_path, capsys):
    """qemu killed while the image was open: its bitmaps stay in_use on
    disk, inconsistent.  info and check say what qemu says; the bitmaps can
    only be removed; check -r all keeps them, as qemu."""
    path = qemu_create(tmp_path / "c.qcow2", SIZE)
    qemu_img("bitmap", "--add", path, "crashed")
    qemu_io(path, "write 0 64k", "sigraise 9", check=False)
    qemu_img("bitmap", "--add", path, "fresh")          # consistent, added after the crash
    assert [b["flags"] for b in qemu_bitmaps(path)] == [["in-use", "auto"], ["auto"]]
    for args in (["info"], ["info", "--output=json"], ["check"], ["check", "--output=json"]):
        q = qemu_img(*args, path, check=False)
        status, out, err = run_cli(capsys, *args, path)
        assert (status, out) == (q.returncode, q.stdout_text), args
    with qcow2fast.open(path) as img:
        assert [b.inconsistent for b in img.bitmaps] == [True, False]
        with pytest.raises(InvalidArgumentError, match="inconsistent"):
            img.dirty_extents("crashed")
    with qcow2fast.open(path, "r+") as img:
        img.write(MiB, b"w")
        with pytest.raises(InvalidArgumentError, match="inconsistent"):
            img.clear_bitmap("crashed")
    assert [b["flags"] for b in qemu_bitmaps(path)] == [["in-use", "auto"], ["auto"]]
    assert merge_runs(qemu_dirty_map(path, "fresh", tmp_path)) == \
        expected_extents(SIZE, 65536, [(MiB, 1)])
    copy = str(tmp_path / "copy.qcow2")
    shutil.copy(path, copy)
    status, _, _ = run_cli(capsys, "check", "-r", "all", path)
    q = qemu_img("check", "-r", "all", copy, check=False)
    assert status == q.returncode == 0
    assert qemu_bitmaps(path) == qemu_bitmaps(copy)
    status, _, err = run_cli(capsys, "bitmap", "--remove", path, "crashed")
    assert status == 0, err
    assert [b["name"] for b in qemu_bitmaps(path)] == ["fresh"]
    qemu_check(path)


def test_disowned_bitmaps_are_dropped_as_qemu_drops_them(tmp_path, capsys):
    """A program that does not know bitmaps wrote the image and cleared the
    autoclear bit: the bitmaps are ignored (qemu's warning), their clusters
    leak, check -r leaks frees them, an open for writing drops the
    extension."""
    path = qemu_made(tmp_path)
    patch(path, H_AUTOCLEAR, ">Q", 0)
    copy = str(tmp_path / "copy.qcow2")
    shutil.copy(path, copy)
    q = qemu_img("check", path, check=False)
    status, out, err = run_cli(capsys, "check", path)
    assert (status, out) == (q.returncode, q.stdout_text) and status == 3
    assert err.splitlines()[0].replace("qcow2fast", "qemu-img") == \
        q.stderr_text.splitlines()[0]
    with qcow2fast.open(path) as img:
        assert img.bitmaps == []
        assert img.read(0, MiB) == b"\1" * MiB
    status, _, _ = run_cli(capsys, "check", "-r", "leaks", path)
    assert status == 0
    qemu_check(path)
    assert EXT_BITMAPS not in [t for t, _ in read_extensions(path)[0]]
    with qcow2fast.open(copy, "r+") as img:
        img.write(0, b"q")
    assert EXT_BITMAPS not in [t for t, _ in read_extensions(copy)[0]]
    assert qemu_bitmaps(copy) == []
    assert qemu_check(copy, expect_clean=False)["leaks"] > 0


# Steps run on both copies: ("resize", size) (--shrink when smaller) or
# ("write", offset, length).  Sizes not a multiple of the granularities
# leave a partial last granule, which keeps its bit, as in qemu.
RESIZES = {
    "grow": [("resize", 128 * MiB), ("write", 100 * MiB, MiB),
             ("write", SIZE - 4096, 8192)],
    "shrink-grow": [("resize", 40 * MiB + 33280), ("write", 40 * MiB + 32768, 512),
                    ("resize", SIZE), ("write", 60 * MiB, 65536)],
    "shrink": [("resize", 30 * MiB), ("write", 30 * MiB - 512, 512)],
}


def stored_bitmaps(path):
    """{name: [data cluster]} as stored: the table sized for the disk, and
    the bits past its end clear."""
    out = {}
    with qcow2fast.open(path) as img:
        f, cs = img.state.file, img.state.cluster_size
        for b in img.bitmaps:
            offs = table_offsets(read_table(f, b.entry, cs)).tolist()
            out[b.name] = [bytes(f.pread(o, cs)) if o else bytes(cs) for o in offs]
    return out


@pytest.mark.parametrize("steps", RESIZES.values(), ids=RESIZES.keys())
def test_resize_resizes_bitmaps_as_qemu(tmp_path, steps):
    """Resizing keeps each bitmap's bits up to the smaller size, the new
    area clean, and later writes past the old end are marked: the same
    steps by qcow2fast (one open) and by qemu-img/qemu-io on a copy give
    the same bitmaps, clean for check, with the same dirty extents."""
    base = qemu_create(tmp_path / "base.qcow2", SIZE)
    qemu_img("bitmap", "--add", base, "qb")
    qemu_io(base, "write 0 1M", "write 40M 64k", "write 50M 4k", "write 63M 1M")
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    shutil.copy(base, ours)
    shutil.copy(base, theirs)
    qemu_img("bitmap", "--add", "-g", "4096", theirs, "fb")
    qemu_io(theirs, f"write -P {ord('f')} 5M 70000")
    size = SIZE
    stale = []      # what qemu shows again of a cluster a shrink cut (ours reads zeros)
    with qcow2fast.open(ours, "r+") as img:
        img.add_bitmap("fb", 4096)
        img.write(5 * MiB, b"f" * 70000)
        for op, *args in steps:
            if op == "resize":
                if args[0] > size and size % 65536:
                    stale.append((size, min(args[0], size - size % 65536 + 65536)))
                img.resize(args[0], shrink=args[0] < size)
                qemu_img("resize", *(["--shrink"] if args[0] < size else []), theirs,
                         str(args[0]))
                size = args[0]
            else:
                img.write(args[0], b"w" * args[1])
                qemu_io(theirs, f"write -P {ord('w')} {args[0]} {args[1]}")
    qemu_check(ours)
    qemu_check(theirs)
    assert qemu_info(ours)["virtual-size"] == qemu_info(theirs)["virtual-size"] == size
    assert qemu_bitmaps(ours) == qemu_bitmaps(theirs)
    want = bytearray(qemu_raw(theirs))
    for lo, hi in stale:
        want[lo:hi] = bytes(hi - lo)
    assert qemu_raw(ours) == want
    assert stored_bitmaps(ours) == stored_bitmaps(theirs)
    last_off, last_len = steps[-1][1:]
    for n in ("qb", "fb"):
        want = merge_runs(qemu_dirty_map(theirs, n, tmp_path))
        assert any(d and o <= last_off and last_off + last_len <= o + k
                   for o, k, d in want), (n, want)      # the last write is marked
        assert merge_runs(qemu_dirty_map(ours, n, tmp_path)) == want, n
        for path in (ours, theirs):
            with qcow2fast.open(path) as img:
                assert merge_runs(img.dirty_extents(n)) == want, (n, path)


def test_resize_refused_with_an_inconsistent_bitmap(tmp_path, capsys):
    """An in_use bitmap (qemu killed) stops a resize, with qemu's message
    and status, before anything is written."""
    path = qemu_create(tmp_path / "c.qcow2", SIZE)
    qemu_img("bitmap", "--add", path, "crashed")
    qemu_io(path, "write 0 64k", "sigraise 9", check=False)
    copy = str(tmp_path / "copy.qcow2")
    shutil.copy(path, copy)
    q = qemu_img("resize", copy, "128M", check=False)
    status, out, err = run_cli(capsys, "resize", path, "128M")
    assert q.returncode == status == 1
    assert (out, err.replace("qcow2fast", "qemu-img")) == (q.stdout_text, q.stderr_text)
    with qcow2fast.open(path, "r+") as img:
        with pytest.raises(InvalidArgumentError, match="'crashed' is inconsistent"):
            img.resize(SIZE // 2, shrink=True)
        assert img.size == SIZE
    assert qemu_info(path)["virtual-size"] == SIZE
    assert qemu_bitmaps(path) == qemu_bitmaps(copy)
