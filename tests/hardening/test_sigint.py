"""Ctrl-C in the middle of a command that changes an image in place: the
process dies as qemu-img does (killed by SIGINT, nothing flushed from
memory), and the image is a crash state: qemu-img check finds no
corruption (leaks at most) and the guest sees what it saw before or
after, never a mix that neither shows."""

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.qemu_util import qemu_img, qemu_io, qemu_raw

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def interrupt_midway(argv, cwd):
    """Run ``qcow2fast ARGV -p``; SIGINT once its progress shows the work
    begun and unfinished.  Returns its exit status."""
    p = subprocess.Popen([sys.executable, "-m", "qcow2fast", *argv], cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, deadline = b"", time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([p.stdout], [], [], deadline - time.monotonic())
            chunk = os.read(p.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                break
            seen += chunk
            # qemu's progress lines: "    (12.34/100%)"
            done = [float(x.split(b"/")[0]) for x in seen.replace(b"\r", b"\n").split(b"(")[1:]
                    if b"/100%)" in x]
            if any(0 < d < 60 for d in done):
                p.send_signal(signal.SIGINT)
                break
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, seen


def checked(path):
    """qemu-img check's status: 0 clean, 3 leaks only (a crash state's)."""
    status = qemu_img("check", str(path), check=False).returncode
    assert status in (0, 3), f"{path}: qemu-img check exited {status}"


@pytest.mark.parametrize("argv,kind", [
    (["commit", "-p", "top.qcow2"], "commit"),
    (["amend", "-p", "-o", "refcount_bits=64", "top.qcow2"], "amend"),
])
def test_interrupted_in_place_command_leaves_a_crash_state(tmp_path, argv, kind):
    size = 256 * MiB
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(base), str(size))
    qemu_io(base, "write -P 1 0 256M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2",
             "-F", "qcow2", str(top))
    qemu_io(top, "write -P 2 0 192M")
    before = qemu_raw(top)
    status, out = interrupt_midway(argv, tmp_path)
    assert status == -signal.SIGINT, (status, out[-300:])
    checked(top)
    checked(base)
    assert qemu_raw(top) == before       # (a commit leaves the top as it was until the end)
