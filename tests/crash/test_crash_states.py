"""Crash states: what a power loss can leave of an image qcow2fast writes
is consistent and keeps every acknowledged write (tests/crash/harness.py
says how the states are made and checked).  A sample of each
configuration's states runs here; ``python -m scripts.crash_states``
runs them all, with more seeds."""

import numpy as np
import pytest

from tests.crash.harness import (Call, apply_calls, make_state, record, run_config, state_plan,
                                 _random_order)
from tests.crash.workloads import BY_NAME

pytestmark = pytest.mark.qemu

# (configuration, states sampled): every cache mode, lazy refcounts, new L2
# tables and refcount structures, copy-on-write over backing files,
# compressed and snapshot-shared clusters, extended L2 entries, v2.
QUICK = [
    ("lazy-writeback-64k", 10),
    ("lazy-writeback-4k-tiny-cache", 8),
    ("writeback-4k-tiny-cache", 5),
    ("writethrough-64k", 4),
    ("none-64k", 4),
    ("directsync-4k", 4),
    ("lazy-writethrough-4k", 4),
    ("lazy-structures-512", 5),
    ("structures-512", 4),
    ("lazy-backing-cow-4k", 6),
    ("compressed-64k", 4),
    ("lazy-snapshot-shared-4k", 5),
    ("extended-l2-backing-64k", 4),
    ("lazy-extended-l2-32k", 4),
    ("v2-4k", 3),
]


@pytest.mark.parametrize("name,states", QUICK)
def test_crash_states(tmp_path, name, states):
    cfg = BY_NAME[name]
    planned, tried, dirty, failures = run_config(cfg, str(tmp_path), seed=hash(name) & 0xffff,
                                                 states=states)
    assert tried == min(states, planned)
    assert not failures, "\n".join(failures[:5])
    if cfg.lazy and cfg.cache_mode == "writeback":
        assert dirty, "no state left the image dirty: lazy refcounts were not exercised"


def test_recording_replays_to_the_file_and_states_cover_the_barriers(tmp_path):
    """The recorder misses nothing (record() replays the log against the
    file the workload left); the plan has a prefix state at every barrier
    and random states between; the last barrier's prefix with everything
    in flight applied is the final file."""
    cfg = BY_NAME["lazy-writeback-4k-tiny-cache"]
    rng = np.random.default_rng(5)
    rec = record(cfg, str(tmp_path), rng)
    syncs = [i for i, c in enumerate(rec.calls) if c.op == "S"]
    assert len(syncs) >= cfg.nops // 5, "each flush syncs"
    plan = state_plan(rec, 3)
    assert sum(1 for _, _, k in plan if k == -1) == len(syncs) + 1
    with open(rec.path, "rb") as f:
        final = f.read()
    # the last state planned: everything since the last barrier applied
    assert plan[-1][1] == len(rec.calls) and plan[-1][2] in (-1, 2)
    assert apply_calls(rec.base, make_state(rec, plan[-1], rng).calls) == final


def test_random_order_keeps_overlapping_calls_in_program_order():
    rng = np.random.default_rng(1)
    calls = [Call("W", 0, 0, 0, 4, b"aaaa"), Call("W", 0, 0, 100, 4, b"bbbb"),
             Call("W", 0, 0, 2, 4, b"cccc"), Call("T", 0, 0, 0, 50), Call("W", 0, 0, 60, 2, b"dd")]
    seen = set()
    for _ in range(200):
        order = _random_order(calls, rng, 200)
        pos = {id(c): i for i, c in enumerate(order)}
        # 0 before 2 (they overlap); the truncate to 50 after 1, before 4
        assert pos[id(calls[0])] < pos[id(calls[2])]
        assert pos[id(calls[1])] < pos[id(calls[3])] < pos[id(calls[4])]
        seen.add(tuple(pos[id(c)] for c in calls))
    assert len(seen) > 1, "never reordered"
    out = apply_calls(b"", _random_order(calls, rng, 200))
    assert len(out) == 62 and out[:6] == b"aacccc" and out[60:] == b"dd"
