"""Allocation corner cases of the write paths."""

import pytest

import qcow2fast

from tests.helpers.qemu_util import qemu_check, qemu_raw

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("cluster_size", [512, 65536])
@pytest.mark.parametrize("data_at", [0, 1000, "end"])
def test_reused_cluster_reads_zero_where_not_written(tmp_path, cluster_size, data_at):
    """A freed host cluster that still holds old bytes (no hole punched, as
    on filesystems without it) is reused by a partial write: the parts the
    write does not cover must read as zeros, not as the old bytes."""
    cs = cluster_size
    path = str(tmp_path / "r.qcow2")
    qcow2fast.create(path, 64 * cs, cluster_size=cs)
    with qcow2fast.open(path, "r+") as img:
        img.flusher._discard_host = lambda offset, n: None   # keep the old bytes on disk
        img.write(0, b"\xff" * (4 * cs))
        img.flush()
        img.discard(0, 4 * cs)
        img.flush()                                       # frees the 4 host clusters
        n = min(300, cs // 2)
        at = cs - n if data_at == "end" else min(data_at, cs - n)
        guest = 10 * cs
        img.write(guest + at, b"\x11" * n)               # reuses a freed cluster
        expected = bytearray(cs)
        expected[at:at + n] = b"\x11" * n
        assert img.read(guest, cs) == expected
        assert img.read(0, 4 * cs) == bytes(4 * cs)
    qemu_check(path)
    raw = qemu_raw(path)
    assert raw[10 * cs:11 * cs] == expected
