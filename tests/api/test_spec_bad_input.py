"""Header fields that only the spec's rules can judge: refused at open with a
CorruptImageError naming the field and its offset, and a one-line error
(exit 1, no traceback) from the command line.

- An extended-L2 image (16-byte L2 entries: an L2 table maps half as much)
  whose l1_size covers the virtual size only if the entries were 8 bytes.
- A backing file name with a NUL byte (no file has such a name).
"""

import os
import subprocess
import sys

import pytest

import qcow2fast
from qcow2fast.errors import CorruptImageError, InvalidArgumentError
from tests.helpers.qemu_util import (REPO, H_BACKING_FILE_OFFSET, H_BACKING_FILE_SIZE, H_L1_SIZE,
                                     MiB, file_state, header, patch, patch_bytes, qemu_check,
                                     qemu_create, qemu_io, read_at)

pytestmark = pytest.mark.qemu

CS = 64 * 1024
# 64 KiB clusters with extended L2 entries: 4096 entries per L2 table, 256 MiB
# per L1 entry (512 MiB with standard entries).
EXTL2_PER_L1 = CS * (CS // 16)


def cli_info(path):
    """``python -m qcow2fast info path`` in a child: (exit status, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "qcow2fast", "info", str(path)],
                       capture_output=True, env=env, timeout=120)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def assert_one_line_error(path, *needles):
    status, out, err = cli_info(path)
    assert status == 1, (status, out, err)
    assert "Traceback" not in err, err
    assert err.startswith("qcow2fast: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


# -- extended L2 entries: l1_size too small for the virtual size -----------------------


@pytest.fixture
def extl2_short_l1(tmp_path):
    """An extended-L2 image of 512 MiB (2 L1 entries needed) whose l1_size
    says 1 -- enough only if its L2 entries were 8 bytes."""
    path = qemu_create(tmp_path / "extl2.qcow2", 2 * EXTL2_PER_L1, cluster_size=CS,
                       extended_l2="on")
    assert header(path)["l1_size"] == 2
    patch(path, H_L1_SIZE, ">I", 1)
    return path


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_extl2_l1_size_too_small_is_refused_at_open(extl2_short_l1, mode):
    before = file_state(extl2_short_l1)
    with pytest.raises(CorruptImageError) as ei:
        qcow2fast.open(extl2_short_l1, mode)
    e = ei.value
    assert e.field == "l1_size" and e.offset == H_L1_SIZE
    assert "l1_size" in str(e) and "0x24" in str(e)
    assert file_state(extl2_short_l1) == before


def test_extl2_l1_size_too_small_cli(extl2_short_l1):
    assert_one_line_error(extl2_short_l1, "l1_size")


def test_extl2_exact_l1_size_writes_at_the_end(tmp_path):
    """The control: with the l1_size qemu wrote, a write in the last cluster
    lands in the second L2 table, and qemu reads it back."""
    path = qemu_create(tmp_path / "ok.qcow2", 2 * EXTL2_PER_L1, cluster_size=CS,
                       extended_l2="on")
    with qcow2fast.open(path, "r+") as img:
        img.write(img.size - 4096, b"\x5a" * 4096)
    qemu_check(path)
    qemu_io(path, f"read -P 0x5a {2 * EXTL2_PER_L1 - 4096} 4096")


def test_standard_l2_one_l1_entry_still_opens(tmp_path):
    """The same l1_size is right for 8-byte entries: a standard image of
    that size needs one L1 entry and opens."""
    path = qemu_create(tmp_path / "std.qcow2", 2 * EXTL2_PER_L1, cluster_size=CS)
    assert header(path)["l1_size"] == 1
    with qcow2fast.open(path, "r+") as img:
        img.write(img.size - 4096, b"\x5a" * 4096)
        assert img.read(img.size - 4096, 4096) == b"\x5a" * 4096


# -- backing file name with a NUL byte ---------------------------------------------------


@pytest.fixture
def nul_backing(tmp_path):
    """An overlay whose backing file name reads "ba\\0e.qcow2"."""
    qemu_create(tmp_path / "base.qcow2", MiB)
    path = qemu_create(tmp_path / "top.qcow2", MiB, backing="base.qcow2")
    (off,) = read_at(path, H_BACKING_FILE_OFFSET, ">Q")
    (n,) = read_at(path, H_BACKING_FILE_SIZE, ">I")
    assert read_at(path, off, f"{n}s")[0] == b"base.qcow2"
    patch_bytes(path, off + 2, b"\0")
    return path, off


@pytest.mark.parametrize("kw", [{}, {"backing": False}, {"mode": "r+"}])
def test_nul_in_backing_file_name_is_refused_at_open(nul_backing, kw):
    path, name_at = nul_backing
    before = file_state(path)
    with pytest.raises(CorruptImageError) as ei:
        qcow2fast.open(path, **kw)
    e = ei.value
    assert e.field == "backing_file" and e.offset == name_at
    assert "NUL" in str(e) and f"{name_at:#x}" in str(e)
    assert file_state(path) == before


def test_nul_in_backing_file_name_cli(nul_backing):
    path, name_at = nul_backing
    assert_one_line_error(path, "backing_file", f"{name_at:#x}")


def test_create_refuses_a_backing_file_name_with_nul(tmp_path):
    qemu_create(tmp_path / "base.qcow2", MiB)
    with pytest.raises(InvalidArgumentError, match="NUL"):
        qcow2fast.create(tmp_path / "top.qcow2", MiB, backing_file="ba\0se.qcow2")
    assert not (tmp_path / "top.qcow2").exists()
