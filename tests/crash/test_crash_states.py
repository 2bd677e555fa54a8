"""Crash states: what a power loss can leave of an image qcow2fast writes
is consistent and keeps every acknowledged write (tests/crash/harness.py
says how the states are made and checked).  A sample of each
configuration's states runs here; ``python -m scripts.crash_states``
runs them all, with more seeds."""

import zlib

import numpy as np
import pytest

from tests.crash.harness import (MARK_START, Call, apply_calls, check_state, make_state, record,
                                 run_config, state_plan, _models, _random_order)
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
    ("lazy-directsync-4k", 4),
    ("lazy-backing-writethrough-64k", 4),
    ("lazy-full-backing-writeback-4k", 6),
    ("lazy-structures-512", 5),
    ("structures-512", 4),
    ("lazy-backing-cow-4k", 6),
    ("compressed-64k", 4),
    ("lazy-snapshot-shared-4k", 5),
    ("extended-l2-backing-64k", 4),
    ("lazy-extended-l2-32k", 4),
    ("v2-4k", 3),
    # snapshot create/apply/delete, resize, amend, bitmaps (metadata_ops.py)
    ("snapshot-ops-4k-tiny-cache", 6),
    ("lazy-snapshot-ops-4k", 4),
    ("resize-4k-snapshot", 5),
    ("lazy-resize-writethrough-4k", 3),
    ("amend-refcount-bits-4k", 3),
    ("amend-compat-refcount-512", 4),
    ("amend-lazy-refcounts-4k", 4),
    ("bitmaps-4k-writethrough", 4),
    # external data files (the data file recorded too) and LUKS
    ("datafile-raw-lazy-4k-tiny-cache", 5),
    ("datafile-writeback-64k", 4),
    ("luks-lazy-4k-tiny-cache", 5),
    ("luks-writethrough-4k", 3),
    ("luks-datafile-writeback-64k", 3),
    # commit and rebase: states cut across the chain's files (chain_ops.py)
    ("commit-64k", 5),
    ("commit-base-4k", 3),
    ("lazy-commit-intermediate-64k", 4),
    ("rebase-4k", 4),
]


@pytest.mark.parametrize("name,states", QUICK)
def test_crash_states(tmp_path, name, states):
    cfg = BY_NAME[name]
    # (a seed fixed per configuration: str hashes change with every process)
    seed = zlib.crc32(name.encode()) & 0xffff
    planned, tried, dirty, failures = run_config(cfg, str(tmp_path), seed=seed, states=states)
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
    assert sum(1 for _, k in plan if k == -1) == len(syncs) + 2     # the start, each, the end
    with open(rec.path, "rb") as f:
        final = f.read()
    # the last state planned: everything since the last barrier applied
    assert plan[-1][0] == len(rec.calls) and plan[-1][1] in (-1, 2)
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


def _prefixes_inside(rec, names):
    """The barrier-prefix plan items cut inside (or right after) the first
    operation of each name in ``names``."""
    inside, out, seen = False, [], set()
    for i, c in enumerate(rec.calls):
        if c.op == "M" and c.off < len(rec.ops) and rec.ops[c.off][0] in names - seen:
            inside = c.fid == MARK_START
            if not inside:
                seen.add(rec.ops[c.off][0])
                out.append(i + 1)
        elif c.op == "S" and inside:
            out.append(i + 1)
    return [(cut, -1) for cut in out]


@pytest.mark.parametrize("name,ops", [
    ("snapshot-ops-64k", {"create_snapshot", "apply_snapshot", "delete_snapshot"}),
    ("bitmaps-64k", {"close"}),
])
def test_every_barrier_inside_metadata_ops(tmp_path, name, ops):
    """Every barrier prefix cut inside a snapshot create/apply/delete, or the
    close that stores bitmaps: each state is consistent (metadata_ops.py
    says what that means for each); the states after close show the stored
    bitmaps; and a model asking for more than the disk holds fails."""
    from tests.crash import metadata_ops
    cfg = BY_NAME[name]
    rng = np.random.default_rng(3)
    rec = record(cfg, str(tmp_path), rng)
    plan = _prefixes_inside(rec, ops)
    assert len(plan) >= 3       # (no fdatasync where nothing was written since the last)
    for item in plan:
        check_state(rec, make_state(rec, item, rng), str(tmp_path), rng)
    last = make_state(rec, plan[-1], rng)
    models = _models(rec, last)
    with open(str(tmp_path / "last.qcow2"), "wb") as f:
        f.write(apply_calls(rec.base, last.calls))
    fails = []
    if name == "bitmaps-64k":
        assert last.durable == len(rec.ops) and set(models[0].bitmaps) == {"b0", "b1"}
        for _, bits in models[0].bitmaps.values():
            bits[:] = True              # every granule written: the disk's bitmaps are not
        metadata_ops.check_bitmaps(rec, last, str(tmp_path / "last.qcow2"), models, fails.append)
    else:
        assert models[0].snaps
        models[0].snaps["extra"] = models[0].data
        metadata_ops.check_snapshots(rec, last, str(tmp_path / "last.qcow2"), models,
                                     fails.append)
    assert fails, "the check accepts a state that does not match the model"


def test_chain_states_catch_a_commit_without_barriers(tmp_path):
    """The chain states are strong enough to see a misordered commit:
    under cache=unsafe (no barrier at all) the top can be emptied on disk
    before the data reached the base, and some state must then show the
    guest disk changed (or the base torn)."""
    import dataclasses

    from tests.crash.chain_ops import chain_op
    from tests.crash.harness import StateFailure
    cfg = dataclasses.replace(BY_NAME["commit-64k"], name="commit-unsafe",
                              workload=chain_op("commit", None, False, "unsafe"))
    rng = np.random.default_rng(7)
    rec = record(cfg, str(tmp_path), rng)
    assert {c.fid for c in rec.calls if c.op == "W"} == {0, 1}, "top and mid written"
    caught = []
    for item in state_plan(rec, 6):
        if item[1] < 0:
            continue
        try:
            check_state(rec, make_state(rec, item, rng, 6), str(tmp_path), rng)
        except StateFailure as e:
            caught.append(str(e))
            if "no version the workload gave" in str(e):
                break
    assert any("no version the workload gave" in e for e in caught), caught[:3]


def test_data_file_is_recorded_and_cut_into_states(tmp_path):
    """The external data file is a recorded file of its own: the guest data
    goes there, the image gets only metadata, and the states cut the data
    file at its own barriers (many different data files, not the final one)."""
    cfg = BY_NAME["datafile-writeback-64k"]
    rng = np.random.default_rng(11)
    rec = record(cfg, str(tmp_path), rng)
    assert rec.images == rec.paths[:1] and rec.paths[1].endswith("img.data")
    assert {c.fid for c in rec.calls if c.op == "W"} == {0, 1}, "image and data file written"
    assert any(c.op == "S" and c.fid == 1 for c in rec.calls), "the data file has barriers"
    plan = state_plan(rec, 3)
    data = {apply_calls(rec.bases[1], make_state(rec, item, rng).files.get(1, []))
            for item in plan}
    assert len(data) > len([c for c in rec.calls if c.op == "S" and c.fid == 1]) // 2
    with open(rec.paths[1], "rb") as f:
        assert f.read() in data


def _fresh_writes(cfg, rng):
    """4 KiB writes, each into a cluster nothing was written to."""
    return [("write", 2 * k * cfg.cluster_size + 512, rng.bytes(4096)) for k in range(cfg.nops)]


def _whole_cluster_writes(cfg, rng):
    return [("write", 2 * k * cfg.cluster_size, rng.bytes(cfg.cluster_size))
            for k in range(cfg.nops)]


@pytest.mark.parametrize("name,workload,most", [
    # zeros before: one barrier per write (as qemu), plus the file's growth
    ("lazy-directsync-64k", _fresh_writes, 1),
    # backing data before: the data barrier stays
    ("lazy-full-backing-directsync-4k", _whole_cluster_writes, 2),
])
def test_lazy_sync_mode_barriers_per_allocating_write(tmp_path, name, workload, most):
    """Under lazy refcounts in a sync mode, an allocating write into fresh
    space where the guest saw zeros costs one barrier (the file grows ahead
    stably, ImageState.grow_durable, so the new L2 entry needs no data
    barrier); where the guest saw backing data it costs two.  The crash
    states of both configurations are checked above and by
    scripts.crash_states."""
    import dataclasses
    n = 24
    cfg = dataclasses.replace(BY_NAME[name], name=name + "-count", workload=workload, nops=n)
    rec = record(cfg, str(tmp_path), np.random.default_rng(2))
    syncs = sum(1 for c in rec.calls if c.op == "S")
    if most == 1:
        # + the dirty bit (2), the first L2 table's L1 entry, the growth
        assert n <= syncs <= n + 4
    else:
        assert syncs >= 2 * n


def test_a_sector_never_holds_a_later_write_without_an_earlier_one():
    """The state generator's sector model: where a later in-flight write's
    sector reached the disk, so did the earlier in-flight writes' bytes in
    that sector (seed 1023 of v2-4k once made a sector no write gave it)."""
    from tests.crash.states import _pieces, _sector_closed
    early = Call("W", 0, 0, 100, 1000, b"a" * 1000)     # sectors 0..2
    other = Call("S", 0)
    late = Call("W", 0, 0, 1200, 200, b"b" * 200)       # sector 2 only
    kept = _sector_closed([early, other, late], {2: {2}})
    assert kept == {0: {2}, 2: {2}}
    base = bytes(2048)
    disk = apply_calls(base, _pieces(early, kept[0]) + _pieces(late, kept[2]))
    # sector 2: the page cache's content after both writes; sectors 0-1: untouched
    assert disk[:1024] == base[:1024]
    assert disk[1024:1200] == b"a" * 76 + bytes(100) and disk[1200:1400] == b"b" * 200
    assert _sector_closed([early, late], {}) == {}
    assert _pieces(early, {0, 1, 2}) == [early]


def test_grow_after_an_unaligned_shrink_reads_zeros_in_every_state(tmp_path):
    """resize-64k, seed 4000: a shrink to 8 MiB + 1536 left the old bytes in
    the rest of its last cluster, and the grow back showed them again (as
    qemu 7.2 does); every state of the run is consistent now."""
    planned, tried, _, failures = run_config(BY_NAME["resize-64k"], str(tmp_path), seed=4000,
                                             states=10 ** 6)
    assert tried == planned > 40
    assert not failures, "\n".join(failures[:5])


def _long_unaligned_writes(cfg, rng):
    return [("write", 0x8347a3 + k * (1 << 20), rng.bytes(311890)) for k in range(3)]


@pytest.mark.parametrize("name", ["datafile-raw-lazy-4k-tiny-cache", "writeback-64k"])
def test_no_sector_is_written_by_two_calls_of_one_write(tmp_path, name):
    """A guest write longer than one write call (QF_WRITE_MAX) is cut at
    sector boundaries of the file, never inside a sector: seed 4242 of
    datafile-raw-lazy-4k-tiny-cache once cut one 256 KiB from an unaligned
    start, and a state holding the first call but not the second had a
    sector that was neither old nor new."""
    import dataclasses
    cfg = dataclasses.replace(BY_NAME[name], name=name + "-long", workload=_long_unaligned_writes,
                              nops=3)
    rec = record(cfg, str(tmp_path), np.random.default_rng(3))
    writes = [c for c in rec.calls if c.op == "W"]
    cuts = [(a, b) for a, b in zip(writes, writes[1:])
            if a.fid == b.fid and b.off == a.off + a.len and a.len >= 4096]
    assert len(cuts) >= 3, "each write needs more than one call"
    assert all(b.off % 512 == 0 for _, b in cuts), \
        [(hex(a.off), hex(a.len)) for a, b in cuts if b.off % 512]
