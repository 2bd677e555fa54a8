"""Crash-state testing: what a power loss can leave of an image (or of a
backing chain), checked.

The harness is three modules and this one:

- ``guest.py``: the expected guest content (GuestModel), the operations
  a workload records (``OPS``), the registries other modules extend, and
  ``Config``;
- ``recording.py``: the workload run in a child process under
  ``recorder.c`` (LD_PRELOAD), which logs every write-like call and every
  barrier on each watched file in one global order, with the workload's
  marks (each operation's start and end);
- ``states.py``: the crash states a power loss could leave of the
  recorded files (each file keeps what its own last barrier made stable,
  plus any subset, reordering and tearing of its calls in flight);
- here: checking a state, and running a configuration.

Every state is checked (:func:`check_state`): ``qemu-img check`` and
``qcow2fast check`` find no corruption in any recorded file (leaks are
allowed; an image left dirty -- by lazy refcounts, or by a snapshot
operation inside the COPIED window -- may have wrong refcounts and, if
not lazy, only wrong COPIED flags, and must repair clean through
``check -r all`` and through the rebuild at an r+ open); every guest write
that a flush acknowledged (or that returned, under writethrough/
directsync) reads back, every other byte reads as one of the versions
the workload gave it; every lower file of a chain shows, through its own
chain as qemu reads it, in each sector its content before or after the
workload; qcow2fast opens the image r+ and a further workload succeeds,
checks clean and leaves every internal snapshot as it was.

Adding a workload: a *setup* function makes the image (and its backing
files, snapshots, compressed clusters) before recording, and a
*workload* function returns the guest operations to record, as
``(name, *args)`` tuples.  Each operation name is one entry of ``OPS``: a
``run(img, *args)`` that the child calls on the open image, and a
``model(m, *args)`` that applies its effect to the expected guest content
(a :class:`GuestModel`).  metadata_ops.py adds snapshot, resize, amend
and bitmap operations that way, chain_ops.py commit and rebase, with
DURABLE_OPS/ATOMIC_OPS (what each acknowledges) and STATE_CHECKS (their
own checks).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import numpy as np

from .guest import (ALLOWED_ERRORS, ATOMIC_OPS, DURABLE_OPS, OPS, SECTOR,  # noqa: F401
                    STATE_CHECKS, Config, GuestModel, MiB, _sized, further_workload,
                    random_guest_op)
from .recording import MARK_DONE, MARK_START, Call, read_log, record  # noqa: F401
from .states import (State, _random_order, apply_calls, make_state,  # noqa: F401
                     state_plan)


class StateFailure(AssertionError):
    pass


# qemu's check on an L2 entry whose data is not in the file: never allowed
PAST_EOF = "exceeding the end of the file"


def _qemu_check(path, cfg):
    # (in the image's directory: qemu 7.2 opens a relative data file name from there)
    p = subprocess.run(["qemu-img", "check", "--output=json", *cfg.qemu_args(path)],
                       capture_output=True, text=True, timeout=300, cwd=os.path.dirname(path))
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
    m = GuestModel(rec.initial.copy(), rec.cfg.unit, rec.cfg.cluster_size)
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


def _copied_only(lines):
    """Whether every error line is about a COPIED flag (qemu's and ours)."""
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return all("OFLAG_COPIED" in e or "copied flag" in e for e in errors)


def write_state(rec, state, workdir):
    """The state's files, under their own names in ``workdir``/state (so
    relative backing file names find each other); returns their paths."""
    d = os.path.join(workdir, "state")
    os.makedirs(d, exist_ok=True)
    out = []
    for fid, base in enumerate(rec.bases):
        p = os.path.join(d, os.path.basename(rec.paths[fid]))
        with open(p, "wb") as f:
            f.write(apply_calls(base, state.files.get(fid, [])))
        out.append(p)
    return out


def _check_file(rec, state, path, fail, qemu_repair):
    """check and repair rules for one file of a state (module doc); returns
    whether it was dirty."""
    from qcow2fast.fsck.check import check_image
    from qcow2fast.fsck.repair import repair_image
    cfg = rec.cfg
    dirty = _is_dirty(path)
    q = _qemu_check(path, cfg)

    def excused(lines):
        """A dirty lazy-refcount image may have wrong refcounts; a dirty
        image without them only wrong COPIED flags (a snapshot operation's
        window); on v2, the COPIED window has no dirty bit (ALLOWED_ERRORS)."""
        if dirty:
            return cfg.lazy or _copied_only(lines)
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        return bool(errors) and any(a(rec, state, errors) for a in ALLOWED_ERRORS)
    window = bool(_bad(q)) and not dirty and excused(q["lines"])
    if _bad(q) and not excused(q["lines"]) or q["past_eof"]:
        fail(f"qemu-img check {os.path.basename(path)}: {q}")
    res = check_image(path)
    if (res.corruptions or res.check_errors) and not excused(res.messages) \
            or any(PAST_EOF in m for m in res.messages):
        fail(f"qcow2fast check {os.path.basename(path)}: {res.corruptions} corruptions, "
             f"{res.check_errors} errors: " + "; ".join(res.messages[:5]))
    if window:
        # v2's COPIED window: check -r all mends it before any write.
        repair_image(path, check_image(path, "all"), "all")
        q = _qemu_check(path, cfg)
        if _bad(q):
            fail(f"after check -r all of the COPIED window, qemu-img check: {q}")
    if dirty:
        # check -r all repairs it clean (and qemu's own repair, in the long run).
        copy = path + ".repair"
        shutil.copy(path, copy)
        repair_image(copy, check_image(copy, "all"), "all")
        q = _qemu_check(copy, cfg)
        if _bad(q) or q.get("leaks", 0):
            fail(f"after qcow2fast check -r all, qemu-img check: {q}")
        if qemu_repair:
            shutil.copy(path, copy)
            subprocess.run(["qemu-img", "check", "-q", "-r", "all", *cfg.qemu_args(copy)],
                           capture_output=True, cwd=os.path.dirname(copy))
            q = _qemu_check(copy, cfg)
            if _bad(q):
                fail(f"after qemu-img check -r all, qemu-img check: {q}")
        os.unlink(copy)
    return dirty


def _check_lower_views(rec, paths, fail):
    """Each lower file of a chain shows, through its own chain as qemu reads
    it, in every sector its content before or after the workload."""
    from .recording import qemu_view
    for p, (before, after) in zip(paths[1:], rec.views):
        got = qemu_view(p)
        if len(got) not in (len(before), len(after)):
            fail(f"{os.path.basename(p)} is {len(got)} bytes, neither before nor after")
        n = len(got) // SECTOR
        act = got[:n * SECTOR].reshape(n, SECTOR)
        bad = np.arange(n)
        for exp in (before, after):
            exp = _sized(exp, n * SECTOR).reshape(n, SECTOR)
            bad = bad[(act[bad] != exp[bad]).any(axis=1)]
        if len(bad):
            fail(f"{os.path.basename(p)}: {len(bad)} sectors hold neither its content before "
                 f"nor after the workload (first at guest offset {int(bad[0]) * SECTOR:#x})")


def check_state(rec, state, workdir, rng, *, qemu_repair=False):
    """Check one crash state (module doc); raises StateFailure saying what
    is wrong.  Returns whether the state was dirty."""
    import qcow2fast
    from .metadata_ops import snapshot_contents
    cfg = rec.cfg
    paths = write_state(rec, state, workdir)[:len(rec.images)]   # (the images: checked)
    path = paths[0]
    kw = cfg.read_kw

    def fail(msg):
        keep = os.path.join(workdir, "failed")
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(os.path.dirname(path), keep)
        raise StateFailure(f"{cfg.name}, {state.what}: {msg} (state kept in {keep})")

    dirty = False
    for p in paths:
        dirty |= _check_file(rec, state, p, fail, qemu_repair)
    try:
        with qcow2fast.open(path, **kw) as img:
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
    if len(paths) > 1:
        # qemu reads the chain the same way; every lower layer old or new.
        from .recording import qemu_view
        if not np.array_equal(qemu_view(path), actual):
            fail("qemu-img reads the chain differently from qcow2fast")
        _check_lower_views(rec, paths, fail)
    for check in STATE_CHECKS:
        check(rec, state, path, models, fail)
    # Open r+ (repairing if dirty): the guest content is kept, a further
    # workload succeeds and checks clean, and no internal snapshot changes
    # (a write trusting a stale COPIED flag would overwrite its clusters).
    snaps = snapshot_contents(path, **kw)
    m = GuestModel(actual.copy(), cfg.unit, cfg.cluster_size)
    try:
        with qcow2fast.open(path, "r+", cache_clean_interval=0, **kw) as img:
            if not np.array_equal(np.frombuffer(img.read(0, img.size), np.uint8), actual):
                fail("the r+ open (repair) changed the guest content")
            for name, *args in further_workload(cfg, rng, img.size):
                OPS[name][0](img, *args)
                if OPS[name][1]:
                    OPS[name][1](m, *args)
    except qcow2fast.Qcow2Error as e:
        fail(f"r+ open and further workload: {e}")
    q = _qemu_check(path, cfg)
    if _bad(q):
        fail(f"after the further workload, qemu-img check: {q}")
    with qcow2fast.open(path, **kw) as img:
        if not np.array_equal(np.frombuffer(img.read(0, img.size), np.uint8), m.data):
            fail("the further workload does not read back")
    after = snapshot_contents(path, **kw)
    for name, disk in snaps.items():
        if name not in after or not np.array_equal(after[name], disk):
            fail(f"the further workload changed internal snapshot {name!r}")
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
