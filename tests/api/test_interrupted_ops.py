"""A metadata operation that raises part-way (an I/O error, a limit, an
interrupt between two of its steps) must not be sealed by close: the image
stops taking writes for the session and keeps (v3: gets) its dirty bit, so
the next read-write open repairs it (engine/features.steps).

Each case injects a failure after the operation's first writes, then
checks: writes refused with the reason, the dirty bit on disk after close,
a read-write open repairs, and qemu-img check is clean with the content
kept.  Without the guard close flushed the half-done state and cleared the
dirty bit (snapshot create/delete left OFLAG_COPIED corruption behind a
clean header).
"""

import errno
import os

import pytest

import qcow2fast
from qcow2fast.engine import bitmap, refcount_order, resize, snapshot_ops
from qcow2fast.errors import ReadOnlyImageError
from tests.helpers.qemu_util import (MiB, is_dirty, qemu_check, qemu_create, qemu_img,
                                     qemu_raw)

SIZE = 8 * MiB


def _fail_on_call(monkeypatch, owner, name, nth=1):
    """Make ``owner.name`` raise EIO on its ``nth`` call (earlier calls run)."""
    real = getattr(owner, name)
    calls = [0]

    def failing(*args, **kw):
        calls[0] += 1
        if calls[0] >= nth:
            raise OSError(errno.EIO, f"injected failure in {name}")
        return real(*args, **kw)
    monkeypatch.setattr(owner, name, failing)


def _image(tmp_path, compat="1.1", cluster_size=65536):
    """An image with data over a few L2 tables and one snapshot, and its content."""
    path = str(tmp_path / "img.qcow2")
    qemu_create(path, SIZE, cluster_size=cluster_size, compat=compat)
    rng = os.urandom
    with qcow2fast.open(path, "r+") as img:
        for off in range(0, SIZE, 3 * 65536 + 4096):
            img.write(off, rng(8192))
        img.create_snapshot("s0")
        for off in range(4096, SIZE, 5 * 65536):
            img.write(off, rng(4096))
    return path, qemu_raw(path)


def _snapshot_create(img):
    img.create_snapshot("s1")


def _snapshot_delete(img):
    img.delete_snapshot("s0")


def _snapshot_apply(img):
    img.apply_snapshot("s0")


def _shrink(img):
    img.resize(SIZE // 2, shrink=True)


def _bitmap_store(img):
    img.add_bitmap("b0")
    img.close()


# (name, operation, where the failure is injected, nth call, the content
# after repair: "old" the content before, "half" the first half of it)
CASES = [
    ("snapshot-create", _snapshot_create, (snapshot_ops.Tree, "write_rows", 1), "old"),
    ("snapshot-delete", _snapshot_delete, (snapshot_ops.Snapshots, "_update_copied", 1), "old"),
    ("snapshot-apply", _snapshot_apply, (snapshot_ops.Snapshots, "_sync", 2), "old"),
    ("resize-shrink", _shrink, (resize, "_shrink_reftable", 1), "half"),
    ("bitmap-store", _bitmap_store, (bitmap.Bitmaps, "_write_header", 1), "old"),
]


@pytest.mark.parametrize("op,where,expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_failed_operation_stays_dirty_and_is_repaired(tmp_path, monkeypatch, op, where, expect):
    path, before = _image(tmp_path)
    owner, name, nth = where
    img = qcow2fast.open(path, "r+")
    with monkeypatch.context() as m:
        _fail_on_call(m, owner, name, nth)
        with pytest.raises(OSError, match="injected failure"):
            op(img)
    if not img.closed:
        with pytest.raises(ReadOnlyImageError, match="failed part-way"):
            img.write(0, b"y" * 512)
        img.close()
    assert is_dirty(path), "close cleared the dirty bit over a half-done operation"
    with qcow2fast.open(path, "r+") as img:        # repairs the dirty image
        assert not img.read_only
    assert not is_dirty(path)
    qemu_check(path)
    want = before if expect == "old" else before[:SIZE // 2]
    assert qemu_raw(path) == want


def test_failed_amend_stays_dirty_and_is_repaired(tmp_path, monkeypatch):
    """refcount_bits change failing after its allocations (old structures
    already count the new ones): dirty, repaired, refcount_bits unchanged."""
    path, before = _image(tmp_path)
    _fail_on_call(monkeypatch, refcount_order, "refcount_encode")
    with pytest.raises(OSError, match="injected failure"):
        qcow2fast.amend(path, {"refcount_bits": "8"})
    monkeypatch.undo()
    assert is_dirty(path)
    with qcow2fast.open(path, "r+"):
        pass
    qemu_check(path)
    assert qemu_raw(path) == before
    assert qemu_img("info", path).stdout_text.count("refcount bits: 16") == 1


def test_v2_failed_operation_refuses_writes_and_check_r_all_mends(tmp_path, monkeypatch):
    """v2 has no dirty bit: writes stop, the message says to run check -r
    all, which leaves the image clean with the content kept."""
    path, before = _image(tmp_path, compat="0.10")
    img = qcow2fast.open(path, "r+")
    with monkeypatch.context() as m:
        _fail_on_call(m, snapshot_ops.Snapshots, "_update_copied")
        with pytest.raises(OSError, match="injected failure"):
            img.delete_snapshot("s0")
    with pytest.raises(ReadOnlyImageError, match="check -r all"):
        img.write(0, b"y" * 512)
    img.close()
    qemu_img("check", "-r", "all", path, check=False)
    qemu_check(path)
    assert qemu_raw(path) == before
