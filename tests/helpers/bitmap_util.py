"""Helpers for the persistent-bitmap tests: qemu's view of a bitmap (qemu-nbd
-B and nbdinfo --map=qemu:dirty-bitmap:NAME), and the extents a list of
writes implies."""

import json
import os
import shutil
import socket
import subprocess
import time

from .nbd_util import nbdinfo, require_libnbd, unix_uri
from .qemu_util import require_qemu

QEMU_NBD = shutil.which("qemu-nbd")


def qemu_dirty_map(path, name, sock_dir):
    """[(offset, length, dirty)] of bitmap ``name`` of the qcow2 image at
    ``path`` as qemu-nbd exports it (read-only, so the image is unchanged)."""
    require_qemu()
    require_libnbd()
    assert QEMU_NBD, "qemu-nbd not installed (Debian package qemu-utils)"
    sock = os.path.join(str(sock_dir), f"qnbd-{os.getpid()}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    # -t: a probe connection (below) must not end the server
    p = subprocess.Popen([QEMU_NBD, "-t", "-r", "-f", "qcow2", "-k", sock, "-B", name,
                          str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(1000):       # the socket file exists before qemu-nbd listens on it
            if p.poll() is not None or _accepts(sock):
                break
            time.sleep(0.01)
        if p.poll() is not None:
            raise AssertionError(f"qemu-nbd -B {name} {path} exited {p.returncode}: "
                                 f"{p.stderr.read().decode(errors='replace')}")
        out = nbdinfo("--json", f"--map=qemu:dirty-bitmap:{name}", unix_uri(sock)).stdout_text
    finally:
        p.kill()
        p.wait()
    return [(e["offset"], e["length"], bool(e["type"] & 1)) for e in json.loads(out)]


def _accepts(sock):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sock)
        return True
    except OSError:
        return False
    finally:
        s.close()


def merge_runs(extents):
    """Adjacent extents of the same kind joined (nbdinfo and qemu-nbd may
    split where qcow2fast does not, or the reverse)."""
    out = []
    for off, n, d in extents:
        if out and out[-1][2] == d and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, d)
        else:
            out.append((off, n, d))
    return out


def expected_extents(size, granularity, writes):
    """The extents a bitmap of ``granularity`` over a ``size``-byte disk
    shows after ``writes`` [(offset, length)]: each touched granule dirty."""
    dirty = set()
    for off, n in writes:
        dirty.update(range(off // granularity, (off + n - 1) // granularity + 1))
    out = []
    ngran = -(-size // granularity)
    for g in range(ngran):
        start, end = g * granularity, min((g + 1) * granularity, size)
        out.append((start, end - start, g in dirty))
    return merge_runs(out)
