"""``qcow2fast check -r`` against ``qemu-img check -r`` 7.2 on damaged
images, run as programs: stdout and stderr as one pipe receives them (so
in qemu-img's order: its stdout is buffered as C's stdio), the exit status
and the repaired file (qemu-iotests 060 and 271's cases)."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers.qemu_util import (REPO, MiB, file_state, header, l2_entry_offset, patch,
                                     qemu_check, qemu_create, qemu_img, qemu_io, qemu_map,
                                     qemu_raw, qemu_raw_filled, read_at)

pytestmark = pytest.mark.qemu
KiB = 1024


def _combined(argv, env=None):
    """(status, stdout and stderr as one pipe receives them) of a command."""
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                       timeout=300)
    return p.returncode, p.stdout.decode()


@pytest.mark.parametrize("zeroed", [False, True])
def test_unaligned_extended_entry_repair_as_qemu(tmp_path, zeroed):
    """qemu-iotests 271: an extended L2 entry whose host offset is not
    cluster-aligned.  With an allocated subcluster it cannot be mended: the
    check says so, also in the count after the refcount rebuild the stray
    reference (into the next cluster) causes, and again in the double
    check.  With no subcluster allocated, -r all makes it read as zeros and
    frees the cluster.  Messages, their order in one pipe (stdout buffered
    as C's, whatever PYTHONUNBUFFERED says), status and the repaired
    image's view are qemu-img's."""
    base = qemu_raw_filled(tmp_path / "base.raw", 128 * KiB, 0xff)
    images = []
    for name in ("ours", "qemu"):
        path = tmp_path / f"{name}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-F", "raw", "-b",
                 base, path)
        qemu_io(path, "write -q -P 1 4k 2k", *(["write -q -z 4k 2k"] if zeroed else []))
        with open(path, "r+b") as f:         # the entry's offset 0x50000 -> 0x50200
            f.seek(header(path)["l1_table_offset"])
            l2 = int.from_bytes(f.read(8), "big") & ((1 << 56) - 512)
            f.seek(l2 + 6)
            f.write(b"\x02")
        images.append(path)
    ours = _combined([sys.executable, "-m", "qcow2fast", "check", "-r", "all", images[0]],
                     {"PYTHONUNBUFFERED": "1"})
    theirs = _combined([shutil.which("qemu-img"), "check", "-r", "all", images[1]])
    assert ours == (theirs[0], theirs[1].replace(str(images[1]), str(images[0])))
    assert ("Repairing offset=50200: Preallocated" in ours[1]) == zeroed
    assert ours[1].count("ERROR offset=50200: Data cluster") == (0 if zeroed else 3)
    if zeroed:                  # (else qemu refuses to map or read the image)
        assert qemu_map(images[0]) == qemu_map(images[1])
        qemu_check(images[0])
        assert qemu_raw(images[0]) == qemu_raw(images[1])


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_refcount_repairs_are_said_in_cluster_order(tmp_path, mode):
    """A cluster counted too low below a leaked one (qemu-iotests 060):
    qemu's second comparison says its repairs in cluster order."""
    images = []
    for name in ("ours", "qemu"):
        path = qemu_create(tmp_path / f"{name}.qcow2", 4 * MiB)
        qemu_io(path, "write -P 1 0 64k", "write -P 2 64k 64k")
        (first,) = read_at(path, l2_entry_offset(path, 0), ">Q")
        patch(path, l2_entry_offset(path, 64 << 10), ">Q", first)     # both map the first
        images.append(path)
    ours = _combined([sys.executable, "-m", "qcow2fast", "check", "-r", mode, images[0]])
    theirs = _combined([shutil.which("qemu-img"), "check", "-r", mode, images[1]])
    assert ours == (theirs[0], theirs[1].replace(str(images[1]), str(images[0])))
    assert "Leaked cluster" in ours[1] and "refcount=1 reference=2" in ours[1]


def test_copied_flags_after_a_rebuild_see_the_old_structures_freed(tmp_path):
    """qemu-iotests 060: a data cluster mapped onto the refcount block.
    The rebuild frees the old block, which leaves the data cluster at
    refcount 1: its COPIED flag is right, nothing more to repair."""
    images = []
    for name in ("ours", "qemu"):
        path = qemu_create(tmp_path / f"{name}.qcow2", 64 * MiB)
        with open(path, "r+b") as f:
            f.truncate(0x40000 + 65536)                  # an L2 table at 0x40000
        patch(path, 0x30000, ">Q", (1 << 63) | 0x40000)  # L1[0]
        patch(path, 0x20000 + 8, ">H", 1)                # cluster 4 counted
        patch(path, 0x40000, ">Q", (1 << 63) | 0x20000)  # data onto the refcount block
        images.append(path)
    ours = _combined([sys.executable, "-m", "qcow2fast", "check", "-r", "all", images[0]])
    theirs = _combined([shutil.which("qemu-img"), "check", "-r", "all", images[1]])
    assert ours == (theirs[0], theirs[1].replace(str(images[1]), str(images[0])))
    assert "Rebuilding refcount structure" in ours[1] and "OFLAG_COPIED" not in ours[1]
    qemu_check(images[0])


def test_refcount_block_far_past_the_end_is_not_grown_to(tmp_path):
    """qemu-iotests 060: a refcount table entry naming a block 72 PB past
    the end of a 192 KiB file.  -r all does not try to count a file that
    large (it ran out of memory): as qemu's truncate failing with EFBIG,
    the structures are rebuilt instead, and qemu checks the result clean."""
    images = []
    for name in ("ours", "qemu"):
        path = qemu_create(tmp_path / f"{name}.qcow2", 64 * MiB)
        patch(path, header(path)["refcount_table_offset"] + 8, ">Q", 0xffffff00000000)
        images.append(path)
    ours = _combined([sys.executable, "-m", "qcow2fast", "check", "-r", "all", images[0]])
    assert ours[0] == 0, ours[1]
    assert "ERROR could not resize image: File too large\nRebuilding refcount structure" in ours[1]
    qemu_check(images[0])
    assert os.path.getsize(images[0]) < MiB
    theirs = _combined([shutil.which("qemu-img"), "check", "-r", "all", images[1]])
    if "File too large" in theirs[1]:       # (qemu's truncate fails so on ext4, not everywhere)
        assert ours == (theirs[0], theirs[1].replace("qemu-img:", "qcow2fast:"))
        assert file_state(images[0])[0] == file_state(images[1])[0]
