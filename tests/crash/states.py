"""Crash states, their generation: what a power loss can leave of the
recorded files.  A barrier (fdatasync/fsync) orders only its own file's
writes.  A crash just before call ``cut`` leaves, of each file, every
call before that file's last barrier, plus any subset of the calls since
(the calls "in flight"), in any order that keeps calls touching the same
bytes in program order (the page cache and the disk never bring back an
older version of a sector), writes possibly torn at 512-byte granularity;
a lost write or ftruncate also loses the file growth it implied.  A
sector is the unit the disk writes whole, and what it writes is what the
page cache held there at some moment: so a sector holds the in-flight
writes to it up to some point in program order, never a later write's
bytes without an earlier one's (:func:`_sector_closed`).  The
states planned (:func:`state_plan`): a cut at the start, at every barrier
and at the end, each with everything before it applied, and, where
something is in flight, random subsets (some torn) and all of it
reordered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .guest import DURABLE_OPS, SECTOR
from .recording import MARK_DONE, MARK_START, Call


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


def _sectors(c):
    """The file-aligned 512-byte sectors write ``c`` touches."""
    return range(c.off // SECTOR, -(-(c.off + c.len) // SECTOR))


def _pieces(c, sectors):
    """Write ``c`` cut to ``sectors`` (some of its own), as writes: the
    whole call when it keeps every sector."""
    if len(sectors) == len(_sectors(c)):
        return [c]
    out = []
    for q in sorted(sectors):
        lo, hi = max(c.off, q * SECTOR), min(c.off + c.len, (q + 1) * SECTOR)
        out.append(Call("W", c.fid, 0, lo, hi - lo, c.data[lo - c.off:hi - c.off]))
    return out


def _torn(c, rng):
    """Some of write ``c``'s sectors (a torn write)."""
    sectors = _sectors(c)
    keep = rng.random(len(sectors)) < rng.uniform(0.2, 0.8)
    return {q for q, k in zip(sectors, keep) if k}


def _sector_closed(flight, kept):
    """``kept`` ({index in ``flight``: the sectors of that in-flight write
    that reached the disk}) closed under program order per sector: where
    a later write's sector reached the disk, so did every earlier in-flight
    write's part of that sector (the disk wrote the sector as the page
    cache held it then, after the earlier writes)."""
    needed = set()
    for i in range(len(flight) - 1, -1, -1):
        c = flight[i]
        if c.op != "W":
            continue
        mine = kept.get(i, set()) | (needed & set(_sectors(c)))
        if mine:
            kept[i] = mine
            needed |= mine
    return kept


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
    """One crash state: the calls applied to each base file (``files``:
    {fid: [Call]}), and how many guest operations are known durable
    (``durable``: ops[:durable]) and had started (``started``:
    ops[:started]) at the crash."""
    what: str
    files: dict
    durable: int
    started: int

    @property
    def calls(self):
        """The image's (fid 0)."""
        return self.files.get(0, [])


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
    """The crash states of a recording, as (cut, variant): a crash just
    before call ``cut``; variant -1 applies every call before it (nothing
    lost), 0..per_epoch-2 a random subset of each file's calls in flight
    (some torn), per_epoch-1 all of them in a random order."""
    calls = rec.calls
    cuts = [0] + [i for i, c in enumerate(calls) if c.op == "S"] + [len(calls)]
    plan = []
    for cut in sorted(set(cuts)):
        plan.append((cut, -1))
        if any(_in_flight(calls, cut).values()):
            plan.extend((cut, k) for k in range(per_epoch))
    return plan


def _in_flight(calls, cut):
    """{fid: calls since that file's last barrier before ``cut``}."""
    flight = {}
    for c in calls[:cut]:
        if c.op == "S":
            flight[c.fid] = []
        elif c.op in "WTF":
            flight.setdefault(c.fid, []).append(c)
    return flight


def make_state(rec, item, rng, per_epoch=3, torn=0.3):
    """The State of one ``state_plan`` item."""
    cut, k = item
    calls, wt = rec.calls, rec.cfg.durable_on_return
    progress = _op_progress(calls, cut, rec.ops, wt)
    if k < 0:
        files = {}
        for c in calls[:cut]:
            if c.op in "WTF":
                files.setdefault(c.fid, []).append(c)
        return State(f"everything before call {cut}", files, *progress)
    flight = _in_flight(calls, cut)
    files, pieces = {}, 0
    for fid, base in enumerate(rec.bases):
        mine = flight.get(fid, [])
        ids = {id(c) for c in mine}
        stable = [c for c in calls[:cut] if c.op in "WTF" and c.fid == fid and id(c) not in ids]
        chosen = []
        if k == per_epoch - 1:
            chosen = list(mine)                 # all of it, in another order
        else:
            kept, others = {}, set()            # writes: sectors kept; other calls kept
            for i, c in enumerate(mine):
                r = rng.random()
                if r < 0.45:
                    continue
                if c.op != "W":
                    others.add(i)
                else:
                    kept[i] = _torn(c, rng) if r < 0.45 + torn else set(_sectors(c))
            kept = _sector_closed(mine, kept)
            for i, c in enumerate(mine):
                if i in others:
                    chosen.append(c)
                elif kept.get(i):
                    chosen.extend(_pieces(c, kept[i]))
        pieces += len(chosen)
        files[fid] = stable + _random_order(chosen, rng, len(base))
    n = sum(len(v) for v in flight.values())
    return State(f"cut at call {cut}: {pieces} pieces of {n} calls in flight", files, *progress)
