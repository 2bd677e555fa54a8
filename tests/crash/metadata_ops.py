"""Crash-state operations beyond guest I/O (harness.py's OPS): internal
snapshots, resize, amend and persistent dirty bitmaps, with what each
acknowledges and the checks a state gets for them.

What "acknowledged" means here:

- snapshot create/apply/delete, resize and amend are durable when they
  return, in every cache mode (each syncs its own updates; amend closes the
  image).  A state cut inside one shows the image before or after it:
  the snapshot list is the old or the new one, each snapshot's disk is
  intact, and for apply and resize (ATOMIC) the whole guest disk is the
  one before or the one after -- never a mix.  Their workloads put a flush
  before and after each such operation, so nothing else is in flight.
  Leaked clusters are allowed.  Inside snapshot create and delete,
  between the refcount raise (or drop) and the COPIED-flag rewrite, check
  reports OFLAG_COPIED errors (qemu has the same window): on v3 the
  image is dirty there (engine/snapshot_ops.py), so the harness holds it
  to a dirty image's rules (only COPIED errors, repaired clean by check
  -r all and by the r+ open, no snapshot changed by the further
  workload); on v2 (no dirty bit) the states allow exactly those errors
  on a clean image, mended by ``check -r all``
  (tests/interop/test_snapshot_crash.py checks it is one barrier wide).
- bitmaps are stored at close: once close returned, every bitmap the model
  has is on disk, consistent, and marks every granule written since it was
  added or cleared.  Before that, a bitmap on disk that is not in use
  (not "inconsistent") must also mark every granule written so far; one in
  use is what qemu leaves after a crash and is only dropped.
"""

import struct

import numpy as np

from . import guest
from .guest import OPS, _sized, random_guest_op


# -- internal snapshots ---------------------------------------------------------------------

def _create(img, name, vm_state):
    img.create_snapshot(name, vm_state=vm_state)


def _model_create(m, name, vm_state):
    m.snaps[name] = m.data.copy()


def _apply(img, name):
    img.apply_snapshot(name)


def _model_apply(m, name):
    m.data = m.snaps[name].copy()


def _delete(img, name):
    img.delete_snapshot(name)


def _model_delete(m, name):
    del m.snaps[name]


# -- resize, amend ------------------------------------------------------------------------------

def _resize(img, size, preallocation="off"):
    img.resize(size, shrink=True, preallocation=preallocation)


def _model_resize(m, size, preallocation="off"):
    m.data = _sized(m.data, size)


def _amend(img, options):
    """Close, amend (which opens the image itself), reopen as before."""
    import qcow2fast
    path, kw = img.path, img.open_kw
    img.close()
    qcow2fast.amend(path, options)
    img = qcow2fast.open(path, "r+", **kw)
    img.open_kw = kw
    return img


# -- dirty bitmaps ---------------------------------------------------------------------------

def _add_bitmap(img, name, gran):
    img.add_bitmap(name, gran)


def _model_add_bitmap(m, name, gran):
    m.bitmaps[name] = (gran, np.zeros(-(-len(m.data) // gran), bool))


def _clear_bitmap(img, name):
    img.clear_bitmap(name)


def _model_clear_bitmap(m, name):
    m.bitmaps[name][1][:] = False


def _remove_bitmap(img, name):
    img.remove_bitmap(name)


def _model_remove_bitmap(m, name):
    del m.bitmaps[name]


def _close(img):
    img.close()


OPS.update({
    "create_snapshot": (_create, _model_create),
    "apply_snapshot": (_apply, _model_apply),
    "delete_snapshot": (_delete, _model_delete),
    "resize": (_resize, _model_resize),
    "amend": (_amend, None),
    "add_bitmap": (_add_bitmap, _model_add_bitmap),
    "clear_bitmap": (_clear_bitmap, _model_clear_bitmap),
    "remove_bitmap": (_remove_bitmap, _model_remove_bitmap),
    "close": (_close, None),
})
guest.DURABLE_OPS |= {"create_snapshot", "apply_snapshot", "delete_snapshot", "resize",
                        "amend", "close"}
guest.ATOMIC_OPS |= {"apply_snapshot", "resize"}


# -- reading and checking states --------------------------------------------------------------

def snapshot_contents(path, **kw):
    """{name: disk} of the internal snapshots of the image at ``path``
    (opened with ``kw``: a LUKS image's key)."""
    import qcow2fast
    with qcow2fast.open(path, **kw) as img:
        names = [s.name for s in img.snapshots]
    out = {}
    for name in names:
        with qcow2fast.open(path, snapshot=name, **kw) as v:
            out[name] = np.frombuffer(v.read(0, v.size), np.uint8).copy()
    return out


def _in_flight(rec, state):
    return {name for name, *_ in rec.ops[state.durable:state.started]}


def _copied_window(rec, state, errors):
    """qemu's COPIED-flag window inside snapshot create/delete, on a clean
    image: v2 only (v3 has the dirty bit set there)."""
    return rec.cfg.compat == "0.10" and bool(_in_flight(rec, state) & {"create_snapshot", "delete_snapshot"}) and \
        all("OFLAG_COPIED" in e or "copied flag" in e for e in errors)


def check_snapshots(rec, state, path, models, fail):
    if not any(m.snaps for m in models) and not rec.initial_snaps:
        return
    got = snapshot_contents(path, **rec.cfg.read_kw)
    if set(got) not in [set(m.snaps) for m in models]:
        fail(f"snapshots {sorted(got)}: none of the lists the workload gave "
             f"({[sorted(m.snaps) for m in models]})")
    for name, disk in got.items():
        # (a snapshot opened read-only shows the active disk's size, as qemu's
        # snapshot.name= does: compare that much)
        if not any(name in m.snaps and np.array_equal(_sized(m.snaps[name], len(disk)), disk)
                   for m in models):
            fail(f"snapshot {name!r} does not hold the disk it was made of")


def check_bitmaps(rec, state, path, models, fail):
    import qcow2fast
    if not any(m.bitmaps for m in models) and "close" not in _in_flight(rec, state):
        return
    closed = any(name == "close" for name, *_ in rec.ops[:state.durable])
    with qcow2fast.open(path, **rec.cfg.read_kw) as img:
        on_disk = {b.name: b for b in img.bitmaps}
        if closed and set(on_disk) != set(models[0].bitmaps):
            fail(f"closed, bitmaps {sorted(on_disk)} are stored, not {sorted(models[0].bitmaps)}")
        for name, b in on_disk.items():
            known = [m.bitmaps[name] for m in models if name in m.bitmaps]
            if not known:
                fail(f"bitmap {name!r} is on disk, the workload never had it here")
            if b.inconsistent:
                if closed:
                    fail(f"closed, bitmap {name!r} is still in use (inconsistent)")
                continue
            gran, want = known[-1]
            have = np.zeros(len(want), bool)
            for off, n, dirty in img.dirty_extents(name):
                if dirty:
                    have[off // gran:-(-(off + n) // gran)] = True
            missing = np.flatnonzero(want & ~have)
            if len(missing):
                fail(f"bitmap {name!r} misses {len(missing)} written granules (first at guest "
                     f"offset {int(missing[0]) * gran:#x})")


def _header_options(path):
    """compat, refcount_bits and lazy_refcounts of the image's header."""
    with open(path, "rb") as f:
        h = f.read(104)
    version = struct.unpack(">I", h[4:8])[0]
    order = struct.unpack(">I", h[96:100])[0] if version >= 3 else 4
    lazy = version >= 3 and struct.unpack(">Q", h[80:88])[0] & 1
    return {"compat": "0.10" if version == 2 else "1.1", "refcount_bits": 1 << order,
            "lazy_refcounts": "on" if lazy else "off"}


def check_amend(rec, state, path, models, fail):
    """An amend cut anywhere leaves each option as before or after it (one
    amend changing several goes through steps, as qemu's: the refcount
    width changes before a downgrade, after an upgrade)."""
    cfg = rec.cfg
    opts = {"compat": {cfg.compat}, "refcount_bits": {cfg.refcount_bits},
            "lazy_refcounts": {"on" if cfg.lazy and cfg.compat != "0.10" else "off"}}
    for k, (name, *args) in enumerate(rec.ops[:state.started]):
        if name == "amend":
            new = {key: {int(v) if key == "refcount_bits" else str(v)}
                   for key, v in args[0].items()}
            opts = {key: new.get(key, vals) | (vals if k >= state.durable else set())
                    for key, vals in opts.items()}
    got = _header_options(path)
    if any(got[key] not in opts[key] for key in opts):
        fail(f"{got}: not among {opts}")


guest.STATE_CHECKS += [check_snapshots, check_bitmaps, check_amend]
guest.ALLOWED_ERRORS.append(_copied_window)


# -- workloads -----------------------------------------------------------------------------

def _io(cfg, rng, out, n, size):
    for _ in range(n):
        out.append(random_guest_op(rng, size, cfg.max_write))
    out.append(("flush",))


def snapshot_ops(cfg, rng):
    """Writes mixed with snapshot create, apply and delete (each between
    flushes)."""
    ops, live, k = [("flush",)], [], 0
    for _ in range(cfg.nops // 4):
        _io(cfg, rng, ops, 3, cfg.size)
        r = rng.random()
        if r < 0.5 or not live:
            k += 1
            live.append(f"c{k}")
            ops.append(("create_snapshot", live[-1], rng.bytes(int(rng.integers(0, 9000)))))
        elif r < 0.75:
            ops.append(("apply_snapshot", live[int(rng.integers(len(live)))]))
        else:
            ops.append(("delete_snapshot", live.pop(int(rng.integers(len(live))))))
        ops.append(("flush",))
    return ops


def resize_ops(cfg, rng):
    """Writes, grow by half, writes over the new area, shrink below the
    start (freeing clusters), writes, grow back (from inside a cluster);
    each grow with a preallocation mode picked at random."""
    ops, size = [], cfg.size
    for new in (cfg.size * 3 // 2, cfg.size // 2 + 3 * 512, cfg.size):
        _io(cfg, rng, ops, cfg.nops // 8, size)
        grow = (rng.choice(["off", "metadata", "falloc", "full"]),) if new > size else ()
        ops.append(("resize", new, *grow))
        ops.append(("flush",))
        size = new
    _io(cfg, rng, ops, cfg.nops // 8, size)
    return ops


def amend_ops(options_list):
    def workload(cfg, rng):
        ops = []
        for options in options_list:
            _io(cfg, rng, ops, cfg.nops // (len(options_list) + 1), cfg.size)
            ops.append(("amend", options))
        _io(cfg, rng, ops, cfg.nops // (len(options_list) + 1), cfg.size)
        return ops
    return workload


def bitmap_ops(cfg, rng):
    """Two bitmaps added, filled by writes, one cleared and refilled, one
    removed and added again, then close stores them."""
    ops = [("add_bitmap", "b0", 65536), ("add_bitmap", "b1", 4 * 65536)]
    _io(cfg, rng, ops, cfg.nops // 4, cfg.size)
    ops.append(("clear_bitmap", "b0"))
    _io(cfg, rng, ops, cfg.nops // 4, cfg.size)
    ops += [("remove_bitmap", "b1"), ("add_bitmap", "b1", 32768)]
    _io(cfg, rng, ops, cfg.nops // 4, cfg.size)
    ops.append(("close",))
    return ops
