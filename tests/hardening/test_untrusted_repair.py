"""The refcount rebuild on hostile images: ``check -r all`` and the
rebuild of a dirty image at an open for writing finish within the bounds
``check`` keeps (``prlimit --as=1G --cpu=30``), with a clear error where
the image cannot be repaired: each L1 and L2 table is read once, weighted
by its references (fsck/l1_tables.py), where walking every reference
read terabytes (the L1 bomb ran into the CPU limit, the snapshot bomb out
of memory)."""

import shutil
import struct

import pytest

from tests.hardening import hostile
from tests.hardening.test_untrusted import bounded_cli

pytestmark = pytest.mark.qemu

INCOMPAT_DIRTY = 1


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-repair")
    return {name: make(str(d / f"{name}.qcow2")) for name, make in hostile.HOSTILE.items()}


def _bounded(err):
    return "CPU time limit" not in err and "out of memory" not in err


@pytest.mark.parametrize("name", ["l1_bomb"])   # (the rebuild is the dirty open's)
def test_check_repair_of_hostile_images_is_bounded(bombs, name, tmp_path):
    path = str(tmp_path / "repair.qcow2")
    shutil.copy(bombs[name], path)
    status, err = bounded_cli("check", "-r", "all", "--untrusted", path)
    assert _bounded(err), err[-2000:]
    assert status == 1 and "cannot rebuild the refcount structures" in err, err[-2000:]


@pytest.mark.parametrize("name", sorted(hostile.HOSTILE))
def test_dirty_open_of_hostile_images_is_bounded(bombs, name, tmp_path):
    """Marked dirty: the open for writing rebuilds first, and refuses."""
    path = str(tmp_path / "dirty.qcow2")
    shutil.copy(bombs[name], path)
    with open(path, "r+b") as f:
        f.seek(72)
        bits = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", bits | INCOMPAT_DIRTY))
    before = open(path, "rb").read()
    status, err = bounded_cli("snapshot", "--untrusted", "-c", "x", path)
    assert _bounded(err), err[-2000:]
    assert status == 1 and "needs refcount" in err, err[-2000:]
    assert open(path, "rb").read() == before, "a refused rebuild wrote the image"
