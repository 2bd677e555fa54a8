"""Crash-state testing: what a power loss can leave of an image, checked.

A workload runs in a child process under ``recorder.c`` (an LD_PRELOAD
library built here with gcc), which logs every write-like call the engine
makes on the image file -- pwrite/pwritev/write, ftruncate, fallocate --
and every fdatasync/fsync as a barrier, whoever makes it (the C loops of
the Cython kernels included), with the workload's marks (each guest
operation's start and end) in the same sequence.  From the log, crash
states are built the way a power loss could leave the file
(:func:`state_plan`, :func:`make_state`):

- every prefix ending at a barrier;
- for the calls in flight since the last barrier: random subsets, applied
  in a random order that keeps calls touching the same bytes in program
  order (the page cache and the disk never bring back an older version of
  a sector), some writes torn at 512-byte granularity; a lost write or
  ftruncate also loses the file growth it implied.

Every state is checked (:func:`check_state`): ``qemu-img check`` and
``qcow2fast check`` find no corruption (leaks are allowed; an image left
dirty by lazy refcounts must instead repair clean, through ``check -r
all`` and through the rebuild at an r+ open); every guest write that a
flush acknowledged (or that returned, under writethrough/directsync) reads
back, every other byte reads as one of the versions the workload gave it;
qcow2fast opens the state r+ and a further workload succeeds and checks
clean.

Adding a workload: a *setup* function makes the image (and its backing
files, snapshots, compressed clusters) before recording, and a
*workload* function returns the guest operations to record, as
``(name, *args)`` tuples.  Each operation name is one entry of ``OPS``: a
``run(img, *args)`` that the child calls on the open image, and a
``model(m, *args)`` that applies its effect to the expected guest content
(a :class:`GuestModel`).  metadata_ops.py adds snapshot, resize, amend
and bitmap operations that way, with DURABLE_OPS/ATOMIC_OPS (what each
acknowledges) and STATE_CHECKS (their own checks).  One limit: only the image file is
recorded and turned into states today; commit (which writes the backing
file) or an external data file needs the recorder's second path
(CRASHREC_FILES takes several) and per-file states in make_state.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SECTOR = 512

# -- the recorder -------------------------------------------------------------------------


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
    """One recorded call: ``op`` W(rite) T(runcate) F(allocate) S(ync) M(ark)."""
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


# -- guest operations: run in the child, modelled in the parent ----------------------------

class GuestModel:
    """The expected guest content of an image (numpy uint8 of the disk)."""

    def __init__(self, data, unit):
        self.data = data
        self.unit = unit        # discard's granularity: the cluster, or subcluster
        self.snaps = {}         # internal snapshot name -> its disk
        self.bitmaps = {}       # dirty bitmap name -> (granularity, bool per granule)

    def copy(self):
        m = GuestModel(self.data.copy(), self.unit)
        m.snaps = dict(self.snaps)              # snapshot disks are never changed in place
        m.bitmaps = {k: (g, b.copy()) for k, (g, b) in self.bitmaps.items()}
        return m

    def touch(self, off, n):
        """A guest write of [off, off+n): every enabled bitmap marks it."""
        for gran, bits in self.bitmaps.values():
            bits[off // gran:-(-(off + n) // gran)] = True


def _write(img, off, data):
    img.write(off, data)


def _model_write(m, off, data):
    m.data[off:off + len(data)] = np.frombuffer(data, np.uint8)
    m.touch(off, len(data))


def _zero(img, off, n, unmap):
    img.write_zeroes(off, n, may_unmap=unmap)


def _model_zero(m, off, n, unmap):
    m.data[off:off + n] = 0
    m.touch(off, n)


def _discard(img, off, n):
    img.discard(off, n)


def _model_discard(m, off, n):
    a = -(-off // m.unit) * m.unit
    b = (off + n) // m.unit * m.unit
    if b > a:
        m.data[a:b] = 0
    m.touch(off, n)


def _compressed(img, off, data):
    img.write_compressed(off, data)


def _flush(img):
    img.flush()


# name: (run in the child on the open Image, effect on a GuestModel or None)
OPS = {
    "write": (_write, _model_write),
    "zero": (_zero, _model_zero),
    "discard": (_discard, _model_discard),
    "compressed": (_compressed, _model_write),
    "flush": (_flush, None),
}
# Operations acknowledged (durable) when they return, in every cache mode;
# ATOMIC ones leave, cut anywhere, the whole guest disk as before or after
# them (their workloads put flushes around them so nothing else is in flight).
DURABLE_OPS = {"flush"}
ATOMIC_OPS = set()
# check(rec, state, path, models, fail) run on every state: models are the
# GuestModels the state may hold (after ops[:durable] ... ops[:started]).
STATE_CHECKS = []
# Whether a state may show qemu-compatible check errors (messages) that a
# crash inside one of its in-flight operations can leave: allow(rec, state, lines).
ALLOWED_ERRORS = []


def child_main(spec_path):
    """The recorded process: open the image, run the operations between
    marks, and end with os._exit (no close: a crash may come later)."""
    import ctypes

    import qcow2fast
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    from . import metadata_ops  # noqa: F401  (registers its OPS)
    mark = ctypes.CDLL(None).crashrec_mark
    mark.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    img = qcow2fast.open(spec["path"], "r+", **spec["open_kw"])
    img.open_kw = spec["open_kw"]
    for k, (name, *args) in enumerate(spec["ops"]):
        mark(MARK_START, k, 0)
        # an operation that reopens the image (amend) returns the new one
        img = OPS[name][0](img, *args) or img
        mark(MARK_DONE, k, 0)
    if spec["close"]:
        img.close()
        mark(MARK_DONE, len(spec["ops"]), 0)
    sys.stdout.flush()
    os._exit(0)


# -- configurations -------------------------------------------------------------------------

MiB = 1 << 20


@dataclass
class Config:
    """One crash-state configuration: how the image is made (``setup``), the
    guest operations recorded on it (``workload``), how it is opened."""
    name: str
    setup: object                       # setup(cfg, dir, rng) -> image path
    workload: object                    # workload(cfg, rng) -> [(op, *args)]
    size: int = 16 * MiB
    cluster_size: int = 65536
    cache_mode: str = "writeback"
    lazy: bool = False
    extended_l2: bool = False
    compat: str = "1.1"
    refcount_bits: int = 16
    open_kw: dict = field(default_factory=dict)
    nops: int = 40
    max_write: int = 320 * 1024

    @property
    def durable_on_return(self):
        return self.cache_mode in ("writethrough", "directsync")

    @property
    def unit(self):
        return self.cluster_size // 32 if self.extended_l2 else self.cluster_size


def initial_content(path, size):
    import qcow2fast
    with qcow2fast.open(path) as img:
        return np.frombuffer(img.read(0, size), np.uint8).copy()


@dataclass
class Recording:
    cfg: Config
    path: str                           # the image (its state at the start is ``base``)
    base: bytes
    ops: list
    calls: list                         # [Call] on the image (fid 0), marks included
    initial: np.ndarray                 # guest content before the workload
    initial_snaps: dict                 # and its internal snapshots' disks, by name
    backing_dir: str


def record(cfg, workdir, rng):
    """Set up ``cfg``'s image in ``workdir``, run its workload recorded, and
    return the Recording."""
    path = cfg.setup(cfg, workdir, rng)
    path = os.path.realpath(path)
    ops = cfg.workload(cfg, rng)
    with open(path, "rb") as f:
        base = f.read()
    initial = initial_content(path, cfg.size)
    from .metadata_ops import snapshot_contents
    initial_snaps = snapshot_contents(path)
    spec = os.path.join(workdir, "spec.pickle")
    with open(spec, "wb") as f:
        pickle.dump({"path": path, "ops": ops, "open_kw": dict(cfg.open_kw,
                                                               cache_mode=cfg.cache_mode,
                                                               cache_clean_interval=0),
                     "close": False}, f)
    log = os.path.join(workdir, "calls.log")
    if os.path.exists(log):
        os.unlink(log)
    env = dict(os.environ, LD_PRELOAD=build_recorder(), CRASHREC_LOG=log, CRASHREC_FILES=path,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c",
                        "import sys; from tests.crash.harness import child_main; "
                        "child_main(sys.argv[1])", spec],
                       env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"{cfg.name}: the recorded workload failed:\n{p.stderr[-3000:]}")
    files, calls = read_log(log)
    assert files == [path], files
    with open(path, "rb") as f:
        final = f.read()
    rec = Recording(cfg, path, base, ops, calls, initial, initial_snaps, workdir)
    # The log replayed whole is the file the child left: nothing was missed.
    assert apply_calls(base, [c for c in calls if c.op in "WTF"]) == final, \
        f"{cfg.name}: replaying the log does not give the file the workload left"
    return rec


# -- crash states -------------------------------------------------------------------------------

def _extent(c, size):
    """The file bytes a call touches (a truncate: all beyond the smaller size)."""
    if c.op == "W":
        return c.off, c.off + c.len
    if c.op == "T":
        return min(c.len, size), 1 << 62
    return c.off, c.off + c.len


def apply_calls(base, calls):
    """The file ``base`` with ``calls`` (W/T/F, possibly torn) applied in order."""
    buf = bytearray(base)
    for c in calls:
        if c.op == "W":
            end = c.off + len(c.data)
            if end > len(buf):
                buf.extend(bytes(end - len(buf)))
            buf[c.off:end] = c.data
        elif c.op == "T":
            if c.len < len(buf):
                del buf[c.len:]
            else:
                buf.extend(bytes(c.len - len(buf)))
        elif c.op == "F":
            keep_size = c.mode != -1 and c.mode & 1         # FALLOC_FL_KEEP_SIZE
            punch = c.mode != -1 and c.mode & (0x02 | 0x10)  # PUNCH_HOLE, ZERO_RANGE
            end = c.off + c.len
            if end > len(buf) and not keep_size:
                buf.extend(bytes(end - len(buf)))
            if punch:
                lo, hi = min(c.off, len(buf)), min(end, len(buf))
                buf[lo:hi] = bytes(hi - lo)
    return bytes(buf)


def _torn(c, rng):
    """Some of write ``c``'s 512-byte sectors (file-aligned), as writes."""
    pieces = []
    pos = c.off
    while pos < c.off + c.len:
        nxt = min((pos // SECTOR + 1) * SECTOR, c.off + c.len)
        pieces.append((pos, nxt))
        pos = nxt
    keep = rng.random(len(pieces)) < rng.uniform(0.2, 0.8)
    return [Call("W", c.fid, 0, lo, hi - lo, c.data[lo - c.off:hi - c.off])
            for (lo, hi), k in zip(pieces, keep) if k]


def _random_order(atoms, rng, size):
    """The atoms in a random order that keeps overlapping ones in program
    order: each gets a random key above the keys of the earlier atoms it
    overlaps, and they are sorted by key."""
    n = len(atoms)
    if n < 2:
        return list(atoms)
    ext = np.array([_extent(a, size) for a in atoms], dtype=np.int64)
    lo, hi = ext[:, 0], ext[:, 1]
    keys = rng.random(n)
    for i in range(1, n):
        over = (lo[:i] < hi[i]) & (lo[i] < hi[:i])
        if over.any():
            keys[i] = max(keys[i], keys[:i][over].max() + 1e-9)
    return [atoms[i] for i in np.argsort(keys, kind="stable")]


@dataclass
class State:
    """One crash state: the calls applied to the base file, and how many
    guest operations are known durable (``durable``: ops[:durable]) and had
    started (``started``: ops[:started]) at the crash."""
    what: str
    calls: list
    durable: int
    started: int


def _op_progress(calls, end, ops, durable_on_return):
    """(durable, started) guest operations for a crash just before call
    index ``end``."""
    started = durable = 0
    for c in calls[:end]:
        if c.op != "M":
            continue
        if c.fid == MARK_START:
            started = c.off + 1
        elif c.fid == MARK_DONE and c.off < len(ops):
            if durable_on_return or ops[c.off][0] in DURABLE_OPS:
                durable = c.off + 1
    return durable, started


def state_plan(rec, per_epoch=3):
    """The crash states of a recording, as (first call in flight, barrier
    index, variant): variant -1 is the prefix up to the barrier before the
    calls in flight, 0..per_epoch-2 a random subset of them (some torn),
    per_epoch-1 all of them in a random order."""
    calls = rec.calls
    plan, lo = [], 0
    for b in [i for i, c in enumerate(calls) if c.op == "S"] + [len(calls)]:
        plan.append((lo, b, -1))
        if any(c.op in "WTF" for c in calls[lo:b]):
            plan.extend((lo, b, k) for k in range(per_epoch))
        lo = b + 1
    return plan


def make_state(rec, item, rng, per_epoch=3, torn=0.3):
    """The State of one ``state_plan`` item."""
    lo, b, k = item
    calls, wt, size = rec.calls, rec.cfg.durable_on_return, len(rec.base)
    stable = [c for c in calls[:lo] if c.op in "WTF"]
    if k < 0:
        return State(f"prefix to call {lo}", stable, *_op_progress(calls, lo, rec.ops, wt))
    flight = [c for c in calls[lo:b] if c.op in "WTF"]
    chosen = []
    if k == per_epoch - 1:
        chosen = list(flight)                   # all of it, in another order
    else:
        for c in flight:
            r = rng.random()
            if r < 0.45:
                continue
            chosen.extend(_torn(c, rng) if c.op == "W" and r < 0.45 + torn else [c])
    return State(f"calls {lo}..{b}: {len(chosen)} pieces of {len(flight)} calls in flight",
                 stable + _random_order(chosen, rng, size), *_op_progress(calls, b, rec.ops, wt))


# -- checking a state -------------------------------------------------------------------------

class StateFailure(AssertionError):
    pass


# qemu's check on an L2 entry whose data is not in the file: never allowed
PAST_EOF = "exceeding the end of the file"


def _qemu_check(path):
    p = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True,
                       text=True, timeout=300)
    try:
        res = json.loads(p.stdout)
    except ValueError:
        res = {"check-errors": 1, "corruptions": 0}
    res["exit"] = p.returncode
    res["past_eof"] = PAST_EOF in p.stderr
    res["lines"] = p.stderr.splitlines()
    res["stderr"] = p.stderr[-1500:]
    return res


def _bad(res):
    return res.get("corruptions", 0) or res.get("check-errors", 0)


def _is_dirty(path):
    with open(path, "rb") as f:
        h = f.read(80)
    return struct.unpack(">I", h[4:8])[0] >= 3 and struct.unpack(">Q", h[72:80])[0] & 1


def _models(rec, state):
    """The GuestModels a state may hold: after ops[:durable], and after each
    later operation that had started."""
    m = GuestModel(rec.initial.copy(), rec.cfg.unit)
    m.snaps = dict(rec.initial_snaps)
    for name, *args in rec.ops[:state.durable]:
        if OPS[name][1]:
            OPS[name][1](m, *args)
    models = [m]
    for name, *args in rec.ops[state.durable:state.started]:
        if OPS[name][1]:
            m = m.copy()
            OPS[name][1](m, *args)
            models.append(m)
    return models


def _sized(data, n):
    """``data`` cut or zero-padded to ``n`` bytes (a resize's effect)."""
    return data[:n] if len(data) >= n else np.concatenate([data, np.zeros(n - len(data),
                                                                           np.uint8)])


def _versions(rec, state, actual, models):
    """The sectors of ``actual`` that hold none of the versions the
    workload gave them: the last durable one, or one written after it."""
    n = len(actual) // SECTOR
    act = actual[:n * SECTOR].reshape(n, SECTOR)
    bad = np.arange(n)
    for m in models:
        if not len(bad):
            break
        exp = _sized(m.data, n * SECTOR).reshape(n, SECTOR)
        bad = bad[(act[bad] != exp[bad]).any(axis=1)]
    return bad


def random_guest_op(rng, top, max_len):
    """A random write (65%), zero (15%, with or without unmap) or discard of
    512 B to ``max_len`` bytes below guest offset ``top``; most are sector
    aligned, some not."""
    n = int(rng.integers(512, max_len + 1))
    off = int(rng.integers(0, top - n))
    if rng.random() < 0.7:
        off -= off % SECTOR
        n -= n % SECTOR
    r = rng.random()
    if r < 0.65:
        return ("write", off, rng.bytes(n))
    if r < 0.8:
        return ("zero", off, n, bool(rng.random() < 0.5))
    return ("discard", off, n)


def further_workload(cfg, rng, size=None):
    return [random_guest_op(rng, size or cfg.size, 70000) for _ in range(6)]


def check_state(rec, state, workdir, rng, *, qemu_repair=False):
    """Check one crash state (module doc); raises StateFailure saying what
    is wrong.  Returns whether the state was dirty."""
    import qcow2fast
    from qcow2fast.fsck.check import check_image
    from qcow2fast.fsck.repair import repair_image
    cfg = rec.cfg
    path = os.path.join(workdir, "state.qcow2")
    with open(path, "wb") as f:
        f.write(apply_calls(rec.base, state.calls))

    def fail(msg):
        keep = os.path.join(workdir, "failed.qcow2")
        shutil.copy(path, keep)
        raise StateFailure(f"{cfg.name}, {state.what}: {msg} (state kept in {keep})")

    # A dirty image (lazy refcounts) may have wrong refcounts, nothing else.
    dirty = _is_dirty(path)
    q = _qemu_check(path)

    def allowed(lines):
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        return bool(errors) and any(a(rec, state, errors) for a in ALLOWED_ERRORS)
    window = _bad(q) and allowed(q["lines"])
    if _bad(q) and not (dirty and cfg.lazy) and not window or q["past_eof"]:
        fail(f"qemu-img check: {q}")
    res = check_image(path)
    if (res.corruptions or res.check_errors) and not (dirty and cfg.lazy) \
            and not (window and allowed(res.messages)) \
            or any(PAST_EOF in m for m in res.messages):
        fail(f"qcow2fast check: {res.corruptions} corruptions, {res.check_errors} errors: "
             + "; ".join(res.messages[:5]))
    try:
        with qcow2fast.open(path) as img:
            actual = np.frombuffer(img.read(0, img.size), np.uint8)
    except qcow2fast.Qcow2Error as e:
        fail(f"unreadable: {e}")
    models = _models(rec, state)
    if len(actual) not in {len(m.data) for m in models}:
        fail(f"the disk is {len(actual)} bytes, none of the sizes the workload gave it")
    if any(name in ATOMIC_OPS for name, *_ in rec.ops[state.durable:state.started]) \
            and not any(np.array_equal(actual, m.data) for m in models):
        fail("cut inside an atomic operation, the disk is neither the one before nor after it")
    bad = _versions(rec, state, actual, models)
    if len(bad):
        fail(f"{len(bad)} sectors read as no version the workload gave them (first at guest "
             f"offset {int(bad[0]) * SECTOR:#x}; {state.durable} operations durable)")
    for check in STATE_CHECKS:
        check(rec, state, path, models, fail)
    if window:
        # qemu's COPIED window: check -r all mends it before any write (a
        # write trusting a stale COPIED flag would overwrite a snapshot's
        # cluster, in qemu as here)
        repair_image(path, check_image(path, "all"), "all")
        q = _qemu_check(path)
        if _bad(q):
            fail(f"after check -r all of the COPIED window, qemu-img check: {q}")
    if dirty:
        # check -r all repairs it clean (and qemu's own repair, in the long run).
        copy = os.path.join(workdir, "repair.qcow2")
        shutil.copy(path, copy)
        repair_image(copy, check_image(copy, "all"), "all")
        q = _qemu_check(copy)
        if _bad(q) or q.get("leaks", 0):
            fail(f"after qcow2fast check -r all, qemu-img check: {q}")
        if qemu_repair:
            shutil.copy(path, copy)
            subprocess.run(["qemu-img", "check", "-q", "-r", "all", copy], capture_output=True)
            q = _qemu_check(copy)
            if _bad(q):
                fail(f"after qemu-img check -r all, qemu-img check: {q}")
    # Open r+ (repairing if dirty): the guest content is kept, and a further
    # workload succeeds and checks clean.
    m = GuestModel(actual.copy(), cfg.unit)
    try:
        with qcow2fast.open(path, "r+", cache_clean_interval=0) as img:
            if not np.array_equal(np.frombuffer(img.read(0, img.size), np.uint8), actual):
                fail("the r+ open (repair) changed the guest content")
            for name, *args in further_workload(cfg, rng, img.size):
                OPS[name][0](img, *args)
                if OPS[name][1]:
                    OPS[name][1](m, *args)
    except qcow2fast.Qcow2Error as e:
        fail(f"r+ open and further workload: {e}")
    q = _qemu_check(path)
    if _bad(q):
        fail(f"after the further workload, qemu-img check: {q}")
    with qcow2fast.open(path) as img:
        if not np.array_equal(np.frombuffer(img.read(0, img.size), np.uint8), m.data):
            fail("the further workload does not read back")
    return bool(dirty)


def run_config(cfg, workdir, seed, states=None, per_epoch=3, qemu_repair=False, log=None):
    """Record ``cfg`` and check its crash states (all of them, or a random
    sample of ``states``).  Returns (states planned, tried, dirty ones,
    failures)."""
    rng = np.random.default_rng(seed)
    os.makedirs(workdir, exist_ok=True)
    rec = record(cfg, workdir, rng)
    plan = state_plan(rec, per_epoch)
    if states is not None and states < len(plan):
        plan = [plan[i] for i in sorted(rng.choice(len(plan), size=states, replace=False))]
    tried = dirty = 0
    failures = []
    for item in plan:
        st = make_state(rec, item, rng, per_epoch)
        tried += 1
        try:
            dirty += check_state(rec, st, workdir, rng, qemu_repair=qemu_repair)
        except StateFailure as e:
            failures.append(str(e))
            if log:
                log(str(e))
    return len(state_plan(rec, per_epoch)), tried, dirty, failures
