"""Bitmap clusters placed where qemu places them: the same sequence of
bitmap operations (with qemu-io writes between them) by qemu-img and by
qcow2fast leaves the same bitmap directory and table offsets, table
contents, file size, ``qemu-img check`` and ``info`` (qemu re-stores every
bitmap at each read-write close, each cluster first-fit, and removes a
bitmap from the image at once: iotests 190 and 303 depend on it)."""

import shutil
import struct

import pytest

import qcow2fast
from tests.helpers.bitmap_util import qemu_dirty_map
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import qemu_check, qemu_create, qemu_img, qemu_info, qemu_io

pytestmark = pytest.mark.qemu
MiB = 1 << 20
EXT_BITMAPS = 0x23852875

# (operation, args): "io" is a qemu-io write; the rest are `bitmap` options.
STEPS = [
    ("io", "write -P 1 0 1M"),
    ("bitmap", ["--add", "b1"]),
    ("io", "write -P 2 4M 1M"),
    ("bitmap", ["--add", "b2"]),
    ("bitmap", ["--add", "-g", "512", "b3"]),
    ("io", "write -P 3 40M 3M"),                 # fills b1, b2, b3 (b3: several data clusters)
    ("bitmap", ["--disable", "b3"]),
    ("bitmap", ["--clear", "b2"]),
    ("bitmap", ["--merge", "b1", "b2"]),
    ("bitmap", ["--remove", "b1"]),
    ("bitmap", ["--add", "--disable", "b4"]),
    ("bitmap", ["--enable", "b3"]),
    ("bitmap", ["--remove", "b2"]),
]


def bitmap_layout(path):
    """The bitmaps extension, each directory entry, its table and the file size."""
    raw = open(path, "rb").read()
    pos = struct.unpack_from(">I", raw, 100)[0]
    layout = []
    while True:
        t, n = struct.unpack_from(">II", raw, pos)
        if t == 0:
            break
        if t == EXT_BITMAPS:
            nb, _, dsize, doff = struct.unpack_from(">IIQQ", raw, pos + 8)
            layout.append(("directory", nb, dsize, doff))
            q = doff
            for _ in range(nb):
                toff, tsize, flags, _, gbits, nsize, extra = struct.unpack_from(">QIIBBHI", raw, q)
                name = raw[q + 24 + extra:q + 24 + extra + nsize].decode()
                table = struct.unpack_from(f">{tsize}Q", raw, toff)
                layout.append((name, toff, tsize, flags, gbits, table))
                q += (24 + extra + nsize + 7) & ~7
        pos += 8 + ((n + 7) & ~7)
    return layout, len(raw)


@pytest.mark.parametrize("cluster_size", [65536, 4096])
def test_bitmap_clusters_where_qemu_puts_them(tmp_path, capsys, cluster_size):
    images = {}
    for who in ("qemu", "ours"):
        path = qemu_create(tmp_path / f"{who}.qcow2", 64 * MiB, cluster_size=cluster_size)
        for i, (op, args) in enumerate(STEPS):
            if op == "io":
                qemu_io(path, args)
                continue
            *opts, name = args
            if who == "qemu":
                qemu_img("bitmap", *opts, path, name)
            else:
                status, _, err = run_cli(capsys, "bitmap", *opts, path, name)
                assert status == 0, err
            images.setdefault(i, {})[who] = bitmap_layout(path)
        images.setdefault("end", {})[who] = path
    for i, both in images.items():
        if i != "end":
            assert both["ours"] == both["qemu"], f"after step {i}: {STEPS[i]}"
    theirs, ours = images["end"]["qemu"], images["end"]["ours"]
    check_q, check_o = qemu_check(theirs), qemu_check(ours)
    check_q.pop("filename"), check_o.pop("filename")
    assert check_o == check_q
    info_q, info_o = qemu_info(theirs), qemu_info(ours)
    for k in ("filename", "actual-size"):       # blocks the file system gave: not the layout
        info_q.pop(k), info_o.pop(k)
    assert info_o == info_q


def test_store_bitmaps_checkpoint(tmp_path):
    """img.store_bitmaps(): the bitmaps written now (a copy of the file taken
    then checks clean: new clusters referenced, old ones freed), still in
    use and tracking writes afterwards; at close qemu reads every write."""
    path = qemu_create(tmp_path / "c.qcow2", 64 * MiB)
    qemu_img("bitmap", "--add", path, "b")
    with qcow2fast.open(path, "r+") as img:
        img.write(0, b"x" * 65536)
        before = bitmap_layout(path)
        img.store_bitmaps()
        after = bitmap_layout(path)
        shutil.copy(path, tmp_path / "copy.qcow2")
        img.write(4 * MiB, b"y" * 65536)
        assert img.dirty_extents("b", 0, 8 * MiB) == [
            (0, 65536, True), (65536, 4 * MiB - 65536, False), (4 * MiB, 65536, True),
            (4 * MiB + 65536, 4 * MiB - 65536, False)]
    assert after[0][1][1] != before[0][1][1]            # the table was stored anew
    assert after[0][1][3] & 1                           # and is in use again
    assert after[0][1][5] != (0,)                       # with the first write's data
    qemu_check(tmp_path / "copy.qcow2")
    assert qemu_dirty_map(path, "b", tmp_path)[:4] == [
        (0, 65536, True), (65536, 4 * MiB - 65536, False), (4 * MiB, 65536, True),
        (4 * MiB + 65536, 60 * MiB - 65536, False)]
    [b] = qemu_info(path)["format-specific"]["data"]["bitmaps"]
    assert b["flags"] == ["auto"]
