"""Internal snapshot operations stopped at each of their barriers: what
was written before the barrier is on disk and nothing after it; qemu-img
check and qemu's view of every snapshot say which states are possible
(engine/snapshot_ops.py, module doc: the write order and the COPIED
window).  tests/crash/ rebuilds the finer states a power loss leaves."""

import shutil

import pytest

import qcow2fast
from tests.helpers.qemu_util import (assert_bytes_equal, qemu_check, qemu_img, qemu_info, qemu_io,
                                     qemu_raw)

pytestmark = pytest.mark.qemu
MiB = 1 << 20


CRASH_CHILD = """
import os, sys, qcow2fast
path, op, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
img = qcow2fast.open(path, "r+")
ops = img._snapshot_ops()
real, calls = ops.state, [0]

class Crashing:
    # The image state, except that the stop-th barrier ends the process
    # before it syncs: what was written before it is all that is there.
    def __getattr__(self, name):
        return getattr(real, name)

    def __setattr__(self, name, value):
        setattr(real, name, value)

    def barrier(self):
        calls[0] += 1
        if calls[0] == stop:
            os._exit(9)
        real.barrier()

ops.state = Crashing()
if op == "create":
    img.create_snapshot("new", vm_state=b"v" * 5000)
elif op == "apply":
    img.apply_snapshot("old")
else:
    img.delete_snapshot("old")
print(calls[0])
os._exit(0)
"""


def _dirty(path):
    with open(path, "rb") as f:
        h = f.read(80)
    return int.from_bytes(h[4:8], "big") >= 3 and int.from_bytes(h[72:80], "big") & 1


@pytest.mark.parametrize("op,compat", [("create", "1.1"), ("apply", "1.1"), ("delete", "1.1"),
                                       ("create", "0.10"), ("delete", "0.10")])
def test_interrupted_at_each_barrier(tmp_path, op, compat):
    """The operation stopped at each of its barriers (what was written
    before it is on disk, nothing after): the old or the new snapshot list
    is there, each snapshot and the active disk intact, and qemu-img check
    finds leaks at worst -- except inside the COPIED window (module doc of
    engine/snapshot_ops.py), where on v3 the image is dirty, and both
    qemu's and qcow2fast's open for writing repair it before a write can
    go in place into a snapshot's cluster; on v2 (no dirty bit) only
    OFLAG_COPIED errors, one barrier wide, that check -r all mends."""
    from tests.helpers.qemu_util import run_python
    base = str(tmp_path / "base.qcow2")
    qcow2fast.create(base, 2 * MiB, cluster_size=4096, compat=compat)
    with qcow2fast.open(base, "r+") as img:
        img.write(0, b"a" * 300000)
        img.create_snapshot("old")
        img.write(100000, b"b" * 50000)
        active = img.read(0, img.size)
    with qcow2fast.open(base, snapshot="old") as v:
        old_snap = v.read(0, v.size)
    # A run without a crash counts the barriers.
    probe = str(tmp_path / "probe.qcow2")
    shutil.copy(base, probe)
    p = run_python(CRASH_CHILD.replace("sys.argv[1], sys.argv[2], int(sys.argv[3])",
                                       f"{probe!r}, {op!r}, 0"))
    total = int(p.stdout_text.split()[-1])
    assert total >= 3
    new_active = active if op != "apply" else old_snap
    windows, dirty = [], []
    for stop in range(1, total + 1):
        path = str(tmp_path / f"{op}-{stop}.qcow2")
        shutil.copy(base, path)
        run_python(CRASH_CHILD.replace("sys.argv[1], sys.argv[2], int(sys.argv[3])",
                                       f"{path!r}, {op!r}, {stop}"), check=False)
        result = qemu_check(path, expect_clean=False)
        windows.append(bool(result.get("corruptions")))
        dirty.append(_dirty(path))
        names = {s["name"] for s in qemu_info(path).get("snapshots", [])}
        content = qemu_raw(path)
        if op == "create":
            assert names in ({"old"}, {"old", "new"}), (stop, names)
            assert content == active
            if "new" in names:
                assert_bytes_equal(qemu_raw(path, snapshot="new"), active, f"new at {stop}")
        elif op == "delete":
            assert names in ({"old"}, set()), (stop, names)
            assert content == active
        else:
            assert names == {"old"}
            assert content in (active, new_active), f"apply interrupted at {stop}: a mix"
        if "old" in names:
            assert_bytes_equal(qemu_raw(path, snapshot="old"), old_snap, f"old at {stop}")
        if result.get("corruptions"):
            human = qemu_img("check", path, check=False).stderr_text
            bad = [ln for ln in human.splitlines() if ln.startswith("ERROR")]
            assert bad and all("OFLAG_COPIED" in ln for ln in bad), (op, stop, human)
            if compat == "1.1":
                assert dirty[-1], f"{op} stopped at {stop}: COPIED errors on a clean-flagged image"
                # A write through qemu's and through qcow2fast's r+ open: both
                # repair first, so the snapshot keeps its clusters.
                other = path + ".qf"
                shutil.copy(path, other)
                qemu_io(path, "write -P 0x77 0 300000")
                with qcow2fast.open(other, "r+") as img:
                    img.write(0, b"\x77" * 300000)
                for p_ in (path, other):
                    qemu_check(p_)
                    if "old" in names:
                        assert_bytes_equal(qemu_raw(p_, snapshot="old"), old_snap,
                                           f"old after a write at {stop}")
                    assert qemu_raw(p_)[:300000] == b"\x77" * 300000
            else:
                qemu_img("check", "-r", "all", path)
                qemu_check(path, expect_clean=False)
    if compat == "0.10":
        # No dirty bit: the window stays, one barrier wide (create, delete).
        assert sum(windows) <= 1 and not any(dirty), (windows, dirty)
    else:
        # The dirty bit covers the window; apply needs none.
        assert any(dirty) == (op != "apply"), dirty
    assert not _dirty(probe), "the dirty bit is cleared when the operation returns"
