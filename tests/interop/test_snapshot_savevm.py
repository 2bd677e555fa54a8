"""VM state made by a real QEMU and loaded by one: qemu-system-x86_64's
savevm (a paused 16 MiB pc machine, HMP over stdio) stores a VM state
that qcow2fast reads back byte for byte as qemu-io does; a VM state
qcow2fast stores with create_snapshot is loaded by qemu's loadvm, and a
damaged one is refused by it (so loadvm did read what qcow2fast wrote)."""

import io
import re
import shutil
import subprocess

import pytest

import qcow2fast
from tests.helpers.qemu_util import qemu_check, qemu_img, qemu_info, qemu_io, require

MiB = 1 << 20
QEMU_SYSTEM = shutil.which("qemu-system-x86_64")
MACHINE = ["-machine", "pc", "-accel", "tcg", "-m", "16", "-nodefaults", "-nographic", "-S"]


@pytest.fixture(autouse=True)
def _need_qemu_system():
    require(QEMU_SYSTEM, "qemu-system-x86_64 not installed (Debian package qemu-system-x86)")


def monitor(path, *commands):
    """Run HMP ``commands`` on a paused VM whose one drive is ``path``;
    returns the lines the monitor printed as errors."""
    script = "".join(c + "\n" for c in commands) + "quit\n"
    p = subprocess.run([QEMU_SYSTEM, *MACHINE, "-monitor", "stdio", "-drive",
                        f"file={path},if=none,format=qcow2,id=d0"],
                       input=script.encode(), capture_output=True, timeout=300)
    out = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", p.stdout.decode(errors="replace"))
    assert p.returncode == 0, out + p.stderr.decode(errors="replace")
    return [ln.strip() for ln in out.splitlines() if "Error" in ln]


def qemu_io_vmstate(path, length):
    """The active VM state area's first ``length`` bytes as qemu-io reads
    them (read -v -b of whole sectors: a hex dump)."""
    # (check=False: the dump's text column may spell "error"; the status counts)
    p = qemu_io(path, f"read -v -b 0 {-(-length // 512) * 512}", check=False)
    assert p.returncode == 0, p.stderr_text
    out = p.stdout_text
    data = bytearray()
    for line in out.splitlines():
        m = re.match(r"([0-9a-f]{8}):\s+((?:[0-9a-f]{2} ?)+)", line)
        if m:
            assert int(m.group(1), 16) == len(data)
            data += bytes.fromhex(m.group(2))
    return bytes(data[:length])


def test_savevm_state_read_and_loadvm_of_ours(tmp_path):
    saved = str(tmp_path / "saved.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", saved, str(64 * MiB))
    qemu_io(saved, "write -P 7 0 1M")
    assert monitor(saved, "savevm s1") == []
    info = qemu_info(saved)["snapshots"][0]
    assert info["name"] == "s1" and info["vm-state-size"] > 4096
    # qcow2fast reads qemu's VM state as qemu-io does after qemu-img -a.
    with qcow2fast.open(saved) as img:
        sn = img.snapshots[0]
        assert sn.vm_state_size == info["vm-state-size"]
        vm = img.read_vmstate(sn, 0, sn.vm_state_size)
    assert vm[:8] == b"QEVM\x00\x00\x00\x03"        # the migration stream's magic, version 3
    applied = str(tmp_path / "applied.qcow2")
    shutil.copy(saved, applied)
    qemu_img("snapshot", "-a", "s1", applied)
    assert qemu_io_vmstate(applied, len(vm)) == vm
    # A VM state qcow2fast stores (bytes, and a binary file) loads in qemu.
    ours = str(tmp_path / "ours.qcow2")
    qcow2fast.create(ours, 64 * MiB)
    with qcow2fast.open(ours, "r+") as img:
        img.write(0, b"\x07" * MiB)
        img.create_snapshot("s2", vm_state=vm, vm_clock_nsec=sn.vm_clock_nsec)
        img.write(0, b"\x08" * 4096)
        img.create_snapshot("s3", vm_state=io.BytesIO(vm))
        img.create_snapshot("damaged", vm_state=b"XEVM" + vm[4:])
    qemu_check(ours)
    sizes = {s["name"]: s["vm-state-size"] for s in qemu_info(ours)["snapshots"]}
    assert sizes == {"s2": len(vm), "s3": len(vm), "damaged": len(vm)}
    assert monitor(ours, "loadvm s2", "loadvm s3") == []
    assert monitor(ours, "loadvm damaged")          # loadvm read the stream and refused it
    qemu_check(ours)
