"""Shared by the malformed-image tests (tests/api/test_bad_*.py): a
qemu-made base image, and an attempt to open and read (or write) a patched
copy in a bounded child Python that must end in a clear Qcow2Error."""

import json
import os
import shutil

from .qemu_util import MiB, file_state, qemu_create, qemu_io, run_python

MEM_LIMIT = 1 << 30
CHILD = r"""
import json, sys, traceback
import qcow2fast
path, mode, action, kw = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
res = {"stage": "open"}
try:
    img = qcow2fast.open(path, mode, **kw)
    res["stage"] = action
    try:
        if action == "read":
            size = img.size
            pos = 0
            while pos < size:
                n = min(1 << 20, size - pos)
                img.read(pos, n)
                pos += n
            img.block_status()
        elif action == "write":
            img.write(0, b"\x5a" * 4096)
            img.flush()
        res["stage"] = "done"
    finally:
        img.close()
except BaseException as e:
    res.update(exc=type(e).__name__, mro=[c.__name__ for c in type(e).__mro__],
               msg=str(e), tb=traceback.format_exc())
print("RESULT " + json.dumps(res))
"""


def attempt(path, mode="r", action="read", **kw):
    """Open (+read or write) in a bounded child; return its result dict."""
    code = ("import sys\nsys.argv = ['x'] + " + repr([str(path), mode, action, json.dumps(kw)])
            + "\n" + CHILD)
    try:
        p = run_python(code, timeout=60, check=False, mem_limit=MEM_LIMIT)
    except Exception as e:           # subprocess.TimeoutExpired
        raise AssertionError(f"opening {path} hung (no answer within 60 s): {e}")
    lines = [l for l in p.stdout_text.splitlines() if l.startswith("RESULT ")]
    assert lines, (f"child crashed (exit {p.returncode}) on {path}:\n"
                   f"{p.stdout_text[-3000:]}\n{p.stderr_text[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def expect_error(path, exc, names, *, stage=("open",), mode="r", action="read", **kw):
    """The attempt fails with ``exc`` (a class or tuple) whose message names the field."""
    before = file_state(path) if mode == "r" else None
    res = attempt(path, mode, action, **kw)
    assert "exc" in res, f"{os.path.basename(str(path))}: no error raised (got to {res['stage']})"
    classes = exc if isinstance(exc, tuple) else (exc,)
    assert "Qcow2Error" in res["mro"] or any(c.__name__ in res["mro"] for c in classes
                                             if issubclass(c, OSError)), (
        f"expected a Qcow2Error, got {res['exc']}: {res['msg']}\n{res['tb']}")
    assert any(c.__name__ in res["mro"] for c in classes), (
        f"expected {[c.__name__ for c in classes]}, got {res['exc']}: {res['msg']}\n{res['tb']}")
    assert res["stage"] in stage, (
        f"error raised at {res['stage']}, expected at {stage}: {res['msg']}")
    msg = res["msg"].lower()
    assert any(n.lower() in msg for n in names), (
        f"message does not name any of {names}: {res['msg']!r}")
    if before is not None:
        assert file_state(path) == before, "a read-only open modified the file"
    return res


# -- the base image ----------------------------------------------------------------
CS = 65536


def make_base(tmp_path):
    """A qemu-made v3 image: data clusters, one compressed cluster at 4*CS."""
    path = qemu_create(tmp_path / "base.qcow2", 4 * MiB, cluster_size=CS)
    qemu_io(path, f"write -q -P 0x11 0 {3 * CS}", f"write -q -c -P 0x22 {4 * CS} {CS}",
            f"write -q -P 0x33 {2 * MiB} {CS}")
    return path


def copy(base, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copyfile(base, dst)
    return dst
