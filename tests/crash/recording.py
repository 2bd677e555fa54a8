"""Crash states, the recording: ``recorder.c`` (an LD_PRELOAD library
built here with gcc) logs every write-like call the workload's process
makes on the watched files -- pwrite/pwritev/write, ftruncate, fallocate
-- and every fdatasync/fsync as a barrier of that file, whoever makes it
(the C loops of the Cython kernels included), with the workload's marks
(each guest operation's start and end), all in one sequence: one global
order over several files (a backing chain), each record naming its file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from .guest import OPS

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def build_recorder():
    """Build recorder.c once per source version; returns the .so path."""
    src = os.path.join(HERE, "recorder.c")
    with open(src, "rb") as f:
        tag = hashlib.sha256(f.read()).hexdigest()[:16]
    out_dir = os.path.join(tempfile.gettempdir(), f"qcow2fast-crashrec-{os.getuid()}")
    os.makedirs(out_dir, exist_ok=True)
    so = os.path.join(out_dir, f"recorder-{tag}.so")
    if not os.path.exists(so):
        tmp = f"{so}.{os.getpid()}"
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-o", tmp, src,
                        "-ldl", "-lpthread"], check=True)
        os.replace(tmp, so)
    return so


REC = struct.Struct("<B3xiqqq")         # op, fid (mark kind), mode, off, len
MARK_START, MARK_DONE = 1, 2


@dataclass
class Call:
    """One recorded call: ``op`` W(rite) T(runcate) F(allocate) S(ync) M(ark)
    on file ``fid`` (an index of the recorded paths)."""
    op: str
    fid: int
    mode: int = 0
    off: int = 0
    len: int = 0
    data: bytes = b""


def read_log(path):
    """(file paths, calls) of a recorder log."""
    with open(path, "rb") as f:
        raw = f.read()
    files, calls, pos = [], [], 0
    while pos < len(raw):
        op, fid, mode, off, n = REC.unpack_from(raw, pos)
        pos += REC.size
        op = chr(op)
        if op == "P":
            files.append(raw[pos:pos + n].decode())
            pos += n
            continue
        data = b""
        if op == "W":
            data = raw[pos:pos + n]
            pos += n
        calls.append(Call(op, fid, mode, off, n, data))
    return files, calls


def child_main(spec_path):
    """The recorded process: open the image, run the operations between
    marks, and end with os._exit (no close: a crash may come later)."""
    import ctypes

    import qcow2fast
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    from . import chain_ops, metadata_ops  # noqa: F401  (register their OPS)
    mark = ctypes.CDLL(None).crashrec_mark
    mark.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    img = qcow2fast.open(spec["path"], "r+", **spec["open_kw"])
    img.open_kw = spec["open_kw"]
    for k, (name, *args) in enumerate(spec["ops"]):
        mark(MARK_START, k, 0)
        # an operation that reopens the image (amend, commit) returns the new one
        img = OPS[name][0](img, *args) or img
        mark(MARK_DONE, k, 0)
    if spec["close"]:
        img.close()
        mark(MARK_DONE, len(spec["ops"]), 0)
    sys.stdout.flush()
    os._exit(0)


def initial_content(path, size, **kw):
    import qcow2fast
    with qcow2fast.open(path, **kw) as img:
        return np.frombuffer(img.read(0, size), np.uint8).copy()


def qemu_view(path, cfg=None):
    """The guest disk of ``path`` (through its backing chain) as qemu reads it."""
    out = path + ".raw"
    names = cfg.qemu_args(path) if cfg is not None else [path]
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", *names, out], check=True,
                   capture_output=True, cwd=os.path.dirname(path))
    with open(out, "rb") as f:
        data = np.frombuffer(f.read(), np.uint8).copy()
    os.unlink(out)
    return data


@dataclass
class Recording:
    cfg: object
    paths: list                         # the recorded files; paths[0] is the image
                                        # (the last cfg.aux_files are not images)
    bases: list                         # their bytes at the start
    ops: list
    calls: list                         # [Call] on them, marks included
    initial: np.ndarray                 # guest content before the workload
    initial_snaps: dict                 # and its internal snapshots' disks, by name
    backing_dir: str
    views: list                         # (initial, final) qemu view of each lower path

    @property
    def path(self):
        return self.paths[0]

    @property
    def images(self):
        """The recorded files that are qcow2 images (the chain, top first)."""
        return self.paths[:len(self.paths) - self.cfg.aux_files]

    @property
    def base(self):
        return self.bases[0]


def record(cfg, workdir, rng):
    """Set up ``cfg``'s image (or chain) in ``workdir``, run its workload
    recorded, and return the Recording."""
    paths = cfg.setup(cfg, workdir, rng)
    paths = [os.path.realpath(p) for p in ([paths] if isinstance(paths, str) else paths)]
    ops = cfg.workload(cfg, rng)
    bases = []
    for p in paths:
        with open(p, "rb") as f:
            bases.append(f.read())
    images = paths[:len(paths) - cfg.aux_files]
    initial = initial_content(paths[0], cfg.size, **cfg.read_kw)
    before = [qemu_view(p) for p in images[1:]]
    from .metadata_ops import snapshot_contents
    initial_snaps = snapshot_contents(paths[0], **cfg.read_kw)
    spec = os.path.join(workdir, "spec.pickle")
    with open(spec, "wb") as f:
        pickle.dump({"path": paths[0], "ops": ops,
                     "open_kw": dict(cfg.open_kw, cache_mode=cfg.cache_mode,
                                     cache_clean_interval=0, **cfg.read_kw),
                     "close": False}, f)
    log = os.path.join(workdir, "calls.log")
    if os.path.exists(log):
        os.unlink(log)
    env = dict(os.environ, LD_PRELOAD=build_recorder(), CRASHREC_LOG=log,
               CRASHREC_FILES=":".join(paths),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c",
                        "import sys; from tests.crash.recording import child_main; "
                        "child_main(sys.argv[1])", spec],
                       env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"{cfg.name}: the recorded workload failed:\n{p.stderr[-3000:]}")
    files, calls = read_log(log)
    assert files == paths, files
    views = list(zip(before, [qemu_view(p) for p in images[1:]]))
    rec = Recording(cfg, paths, bases, ops, calls, initial, initial_snaps, workdir, views)
    from .states import apply_calls
    for fid, p in enumerate(paths):
        with open(p, "rb") as f:
            final = f.read()
        mine = [c for c in calls if c.op in "WTF" and c.fid == fid]
        # The log replayed whole is the file the child left: nothing was missed.
        assert apply_calls(bases[fid], mine) == final, \
            f"{cfg.name}: replaying the log does not give the file the workload left ({p})"
        assert not (fid in cfg.untouched and mine), \
            f"{cfg.name}: {p} was written ({len(mine)} calls), the operation must not touch it"
    return rec
