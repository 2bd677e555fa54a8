"""L2 entries pointing past the end of the file (what a power loss left
before the data barrier under lazy refcounts): the rebuild of a dirty image
at an r+ open and ``check -r all`` make them zero clusters (v2: unallocated),
keep every other byte, and leave an image qemu checks clean."""

import json
import os
import shutil

import pytest

import qcow2fast
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import (KiB, MiB, is_dirty, l2_entry_offset, qemu_check,
                                     qemu_create, qemu_img, qemu_io, qemu_raw, read_at)

pytestmark = pytest.mark.qemu


def _host_offset(path, guest):
    for e in json.loads(qemu_img("map", "--output=json", path).stdout_text):
        if e["start"] <= guest < e["start"] + e["length"] and e.get("offset") is not None:
            return e["offset"] + guest - e["start"]
    raise AssertionError(f"guest offset {guest:#x} is not allocated")


def _cut(path, host):
    """The file ends at ``host``: the clusters there and beyond are lost."""
    os.truncate(path, host)


def _killed(path, *cmds):
    p = qemu_io(path, *cmds, "flush", "sigraise 9", check=False)
    assert p.returncode in (-9, 137), p.stderr_text


def _lazy_image_cut_at_its_last_cluster(tmp_path, **kw):
    p = qemu_create(tmp_path / "l.qcow2", 8 * MiB, lazy_refcounts="on", **kw)
    _killed(p, "write -P 0x11 0 100k", "write -P 0x22 1M 64k", "write -P 0x33 3M 64k")
    assert is_dirty(p)
    before = qemu_raw(p)
    _cut(p, _host_offset(p, 3 * MiB))
    expected = bytearray(before)
    expected[3 * MiB:3 * MiB + 64 * KiB] = bytes(64 * KiB)     # lost: reads as zeros
    return p, bytes(expected)


def test_dirty_image_open_repairs_entries_past_eof(tmp_path):
    p, expected = _lazy_image_cut_at_its_last_cluster(tmp_path)
    with qcow2fast.open(p, "r+") as img:
        assert img.read(0, img.size) == expected
        img.write(3 * MiB + 512, b"w" * 1000)      # the cluster is writable again
    qemu_check(p)
    expected = bytearray(expected)
    expected[3 * MiB + 512:3 * MiB + 1512] = b"w" * 1000
    assert qemu_raw(p) == bytes(expected)


def test_check_repair_all_makes_entries_past_eof_zero(tmp_path, capsys):
    p, expected = _lazy_image_cut_at_its_last_cluster(tmp_path)
    q = str(tmp_path / "q.qcow2")
    shutil.copy(p, q)
    end = os.path.getsize(p)
    status, out, err = run_cli(capsys, "check", "-r", "all", p)
    assert status == 0, (out, err)
    assert f"Repairing offset={end:x}: Data cluster lies past the end" in err
    qemu_check(p)
    assert qemu_raw(p) == expected
    assert qemu_img("map", "--output=json", p).stdout_text.count('"zero": true, "data": false') >= 1
    # qemu 7.2 reports the entry and leaves it; its rebuild then hands the
    # cluster out a second time (the refcount block): still corrupt
    assert "exceeding the end of the file" in qemu_img("check", "-r", "all", q,
                                                       check=False).stderr_text
    assert qemu_check(q, expect_clean=False)["corruptions"] > 0


def test_extended_l2_allocated_subclusters_become_zero(tmp_path):
    base = qemu_create(tmp_path / "b.qcow2", 8 * MiB)
    qemu_io(base, "write -P 0x44 0 8M")
    p = qemu_create(tmp_path / "x.qcow2", 8 * MiB, lazy_refcounts="on", extended_l2="on",
                    backing=base)
    _killed(p, "write -P 0x55 0 64k", "write -P 0x66 2M 4k", f"write -P 0x77 {2 * MiB + 32 * KiB} 2k")
    before = qemu_raw(p)
    _cut(p, _host_offset(p, 2 * MiB))
    with qcow2fast.open(p, "r+") as img:
        data = img.read(0, img.size)
    qemu_check(p)
    expected = bytearray(before)
    expected[2 * MiB:2 * MiB + 4 * KiB] = bytes(4 * KiB)                 # allocated: zero
    expected[2 * MiB + 32 * KiB:2 * MiB + 34 * KiB] = bytes(2 * KiB)
    assert data == bytes(expected) == qemu_raw(p)
    assert data[2 * MiB + 8 * KiB:2 * MiB + 9 * KiB] == b"\x44" * KiB   # backing, as before


def test_compressed_cluster_past_eof_becomes_zero(tmp_path, capsys):
    p = qemu_create(tmp_path / "c.qcow2", 4 * MiB, cluster_size=4096, lazy_refcounts="on")
    _killed(p, "write -P 0x12 0 64k", "write -c -P 0x13 1M 4k")
    before = qemu_raw(p)
    (entry,) = read_at(p, l2_entry_offset(p, MiB), ">Q")
    coffset = entry & ((1 << 58) - 1)          # 4 KiB clusters: 62 - (12 - 8) offset bits
    assert coffset >= _host_offset(p, 60 * KiB) + 4 * KiB, "compressed data is last"
    _cut(p, coffset)
    status, out, err = run_cli(capsys, "check", "-r", "all", p)
    assert status == 0 and "Compressed cluster lies past the end" in err, (out, err)
    qemu_check(p)
    expected = bytearray(before)
    expected[MiB:MiB + 4096] = bytes(4096)
    assert qemu_raw(p) == bytes(expected)


def test_v2_entry_past_eof_becomes_unallocated(tmp_path, capsys):
    base = qemu_create(tmp_path / "b.qcow2", 4 * MiB)
    qemu_io(base, "write -P 0x31 0 4M")
    p = qemu_create(tmp_path / "v2.qcow2", 4 * MiB, compat="0.10", backing=base)
    qemu_io(p, "write -P 0x32 0 64k", "write -P 0x33 2M 64k")
    before = qemu_raw(p)
    _cut(p, _host_offset(p, 2 * MiB))
    status, out, err = run_cli(capsys, "check", "-r", "all", p)
    assert status == 0, (out, err)
    qemu_check(p)
    expected = bytearray(before)
    expected[2 * MiB:2 * MiB + 64 * KiB] = b"\x31" * 64 * KiB      # the backing file again
    assert qemu_raw(p) == bytes(expected)


def test_dirty_data_file_image_keeps_its_data(tmp_path, monkeypatch):
    """With an external data file the data clusters lie in the data file, at
    offsets unrelated to the small image file's end, and guest cluster 0 at
    host offset 0 (an L2 entry of COPIED alone): the dirty rebuild must
    neither take the clusters for lost data nor clear that COPIED flag
    (both emptied the clusters; found by the crash states of
    datafile-raw-lazy-4k-tiny-cache)."""
    monkeypatch.chdir(tmp_path)     # (qemu 7.2 opens a relative data file name from the cwd)
    p = str(tmp_path / "d.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=d.data,lazy_refcounts=on,"
             "cluster_size=4096", p, "8M")
    _killed(p, "write -P 0x11 0 100k", "write -P 0x22 6M 64k")
    assert is_dirty(p)
    before = qemu_raw(p)
    with qcow2fast.open(p, "r+") as img:
        assert img.read(0, img.size) == before
    qemu_check(p)
    assert qemu_raw(p) == before and before[:1] == b"\x11" and before[6 * MiB] == 0x22


def test_map_reports_data_past_eof_as_qemu(tmp_path, capsys):
    """qemu-iotests 102: a data cluster cut off the file is mapped where its
    L2 entry points, as qemu-img maps it; reading it is still refused with
    the L2 entry's offset (qemu reads zeros there)."""
    p = qemu_create(tmp_path / "t.qcow2", 64 * KiB)
    qemu_io(p, "write 0 64k")
    _cut(p, 5 * 64 * KiB)               # header, reftable, refblock, L1, L2: the data is gone
    for fmt in ("human", "json"):
        status, out, err = run_cli(capsys, "map", f"--output={fmt}", str(p))
        assert (status, out, err) == (0, qemu_img("map", f"--output={fmt}", p).stdout_text, "")
    with qcow2fast.open(str(p)) as img:
        [ext] = img.block_status()
        assert (ext.kind, ext.host_offset) == ("data", 5 * 64 * KiB)
        with pytest.raises(qcow2fast.CorruptImageError, match="past the end") as e:
            img.read(0, 512)
        assert e.value.offset == 4 * 64 * KiB
