"""amend compat=1.1 of a v2 image whose snapshot table has no extra data
(written by older tools): the table is written anew with the v3 extra
data (VM state size, disk size, icount), as qemu's qcow2_upgrade does,
before the header switches; the result equals qemu-img amend's."""

import shutil
import struct

import pytest

import qcow2fast
from tests.helpers.qemu_util import qemu_img, qemu_info
from tests.interop.test_interop_resize_amend import assert_same, make_image

pytestmark = pytest.mark.qemu

SNAPSHOT_FIXED = struct.Struct(">QIHHIIQII")       # qemu's QCowSnapshotHeader


def _strip_extra_data(path):
    """Rewrite the snapshot table in place without extra data (an entry
    shrinks, so the table fits where it was)."""
    with open(path, "r+b") as f:
        h = f.read(72)
        nb, off = struct.unpack(">IQ", h[60:72])
        f.seek(off)
        raw = f.read(1 << 20)
        out, pos = b"", 0
        for _ in range(nb):
            fields = list(SNAPSHOT_FIXED.unpack_from(raw, pos))
            extra, id_len, name_len = fields[8], fields[2], fields[3]
            names = raw[pos + 40 + extra:pos + 40 + extra + id_len + name_len]
            fields[8] = 0
            entry = SNAPSHOT_FIXED.pack(*fields) + names
            out += entry + bytes(-len(entry) % 8)
            pos += -(-(40 + extra + id_len + name_len) // 8) * 8
        f.seek(off)
        f.write(out.ljust(pos, b"\0"))


def _table(path):
    with open(path, "rb") as f:
        h = f.read(72)
        nb, off = struct.unpack(">IQ", h[60:72])
        f.seek(off)
        return nb, f.read(4096)


def test_upgrade_writes_the_v3_snapshot_table(tmp_path):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "qemu.qcow2"
    names = make_image(ours, (65536, 16, "0.10", {}))
    assert names
    _strip_extra_data(ours)
    assert qemu_info(ours)["snapshots"][0]["name"] == "s1"
    shutil.copy(ours, theirs)
    qemu_img("amend", "-f", "qcow2", "-o", "compat=1.1", str(theirs))
    qcow2fast.amend(str(ours), {"compat": "1.1"})
    assert_same(str(ours), str(theirs), names)
    # the same entries, extra data included (the tables sit at other offsets)
    nb, a = _table(ours)
    nb2, b = _table(theirs)
    assert nb == nb2
    extra = SNAPSHOT_FIXED.unpack_from(a, 0)[8]
    assert extra == SNAPSHOT_FIXED.unpack_from(b, 0)[8] >= 16
    n = 40 + extra + len("1") + len("s1")    # (qemu does not pad the last entry)
    assert a[:n] == b[:n]
