"""An L2 table freed by copy-on-write keeps its clean slices in the L2
cache under its host offset; when that cluster is handed out again as a
new L2 table, the cache must show the new table, not the freed one
(engine/mapping.py, l2_slot_for_write).  Before the fix the new table
read back the old one's entries: guest data of another L1 range showed
through, and a write would have stored those stale entries."""

import struct

import pytest

import qcow2fast
from tests.helpers.qemu_util import qemu_check, qemu_create, qemu_io, qemu_raw

pytestmark = pytest.mark.qemu

MiB = 1 << 20
COPIED = 1 << 63


def test_reused_l2_cluster_shows_the_new_table(tmp_path):
    path = str(tmp_path / "a.qcow2")
    qemu_create(path, 16 * MiB, cluster_size=4096)        # an L2 table maps 2 MiB
    qemu_io(path, "write -P 0x11 0 64k")
    # L1 entry 0 without COPIED although its table has refcount 1 (what
    # older tools or a v2 crash inside a snapshot operation leave): the
    # next write there copies the table and frees the old one.
    with open(path, "r+b") as f:
        l1_offset = struct.unpack(">Q", f.read(48)[40:48])[0]
        f.seek(l1_offset)
        e = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_offset)
        f.write(struct.pack(">Q", e & ~COPIED))
    old_table = e & ~COPIED
    with qcow2fast.open(path, "r+") as img:
        assert img.read(4096, 4) == b"\x11" * 4          # the old table's slice is cached
        img.write(1 * MiB, b"\x22" * 512)                 # copy-on-write of the table
        img.flush()                                       # (the old one freed)
        assert int(img.mapping.l1[0]) & ~COPIED != old_table
        img.write(2 * MiB, b"\x33" * 512)                 # a new table for L1 entry 1
        img.flush()
        assert int(img.mapping.l1[1]) & ~COPIED == old_table, "the freed cluster is reused"
        assert img.read(2 * MiB + 4096, 4096) == bytes(4096)
        img.write(2 * MiB + 8192, b"\x44" * 4096)
        ours = img.read(0, img.size)
    qemu_check(path)
    assert qemu_raw(path) == ours
    assert ours[2 * MiB + 4096:2 * MiB + 8192] == bytes(4096)
