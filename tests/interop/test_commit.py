"""commit against qemu-img commit: the same chain built twice, committed
by each, every layer compared (qemu-img compare through its chain) and
checked clean; an interrupted commit leaves the top's data readable."""

import os

import pytest

import qcow2fast
from qcow2fast._ext.fileio import File
from qcow2fast.engine import empty
from qcow2fast.errors import InvalidArgumentError
from tests.helpers.layers_util import (Layer, assert_same_layers, build_chain, deep_chain, twin,
                                       views)
from tests.helpers.qemu_util import (MiB, qemu_check, qemu_create, qemu_img, qemu_info, qemu_io,
                                     qemu_raw)

pytestmark = pytest.mark.qemu

W = "write -P"


def chain_2():
    return [Layer("base.qcow2", writes=[f"{W} 1 0 6M"]),
            Layer("top.qcow2", writes=[f"{W} 3 1M 2M", "write -z 4M 1M", f"{W} 4 9M 64k"])]


def chain_4():
    return [Layer("base.qcow2", writes=[f"{W} 1 0 8M"]),
            Layer("l1.qcow2", cluster_size=4096, writes=[f"{W} 2 1M 3M", "write -z 6M 512k"]),
            Layer("l2.qcow2", writes=["write -c -P 5 2M 128k", f"{W} 6 7M 1M"]),
            Layer("top.qcow2", cluster_size=2 * MiB, writes=[f"{W} 7 3M 100k", "write -z 0 2M"])]


CASES = {
    "depth2": (chain_2, ()),
    "depth4": (chain_4, ()),
    "depth4-d": (chain_4, ("-d",)),
    "depth4-b-l1": (chain_4, ("-b", "l1.qcow2")),
    "depth4-b-base": (chain_4, ("-b", "base.qcow2")),
    "depth12": (lambda: deep_chain(12), ()),
    "depth12-b-l0": (lambda: deep_chain(12), ("-b", "l0.qcow2")),
    "depth12-b-l5": (lambda: deep_chain(12), ("-b", "l5.qcow2")),
    "raw-base": (lambda: [Layer("base.raw", fmt="raw", writes=[f"{W} 1 0 3M"]),
                          Layer("top.qcow2", writes=[f"{W} 3 1M 2M", "write -z 5M 1M"])], ()),
    "compressed-zero": (lambda: [
        Layer("base.qcow2", writes=["write -c -P 1 0 1M", f"{W} 2 4M 1M"]),
        Layer("top.qcow2", writes=["write -c -P 3 2M 512k", "write -z 4M 256k",
                                   "write -z 4352k 1k"])], ()),
    "extended-l2": (lambda: [
        Layer("base.qcow2", extended_l2="on", cluster_size=128 * 1024,
              writes=[f"{W} 1 0 5M"]),
        Layer("top.qcow2", extended_l2="on", cluster_size=128 * 1024,
              writes=[f"{W} 3 12k 4k", "write -z 1M 20k", f"{W} 4 3M 1M"])], ()),
    "v2": (lambda: [Layer("base.qcow2", compat="0.10", writes=[f"{W} 1 0 4M"]),
                    Layer("mid.qcow2", compat="0.10", writes=[f"{W} 2 1M 1M"]),
                    Layer("top.qcow2", compat="0.10", writes=[f"{W} 3 3M 2M", "write -z 0 64k"])],
           ()),
    "snapshot-top": (lambda: [Layer("base.qcow2", writes=[f"{W} 1 0 4M"]),
                              Layer("top.qcow2", writes=[f"{W} 3 1M 2M", "snapshot s1",
                                                         f"{W} 4 2M 2M", "write -z 6M 1M"])],
                     ()),
    "short-base": (lambda: [Layer("base.qcow2", size=5 * MiB, writes=[f"{W} 1 0 5M"]),
                            Layer("mid.qcow2", size=8 * MiB, writes=[f"{W} 2 1M 1M"]),
                            Layer("top.qcow2", size=16 * MiB, writes=[f"{W} 3 10M 1M"])],
                   ("-b", "base.qcow2")),
    "short-mid": (lambda: [Layer("base.qcow2", size=16 * MiB, writes=[f"{W} 1 0 16M"]),
                           Layer("mid.qcow2", size=6 * MiB, writes=[f"{W} 2 1M 1M"]),
                           Layer("top.qcow2", size=16 * MiB, writes=[f"{W} 3 2M 1M"])],
                  ("-b", "base.qcow2")),
    "short-backing": (lambda: [Layer("base.qcow2", size=4 * MiB, writes=[f"{W} 1 0 4M"]),
                               Layer("top.qcow2", size=12 * MiB,
                                     writes=[f"{W} 3 1M 1M", f"{W} 4 8M 1M"])], ()),
}


def fmts_of(paths):
    return ["raw" if p.endswith(".raw") else "qcow2" for p in paths]


@pytest.mark.parametrize("case", sorted(CASES))
def test_commit_matches_qemu(tmp_path, case):
    make, argv = CASES[case]
    ours, theirs = twin(str(tmp_path), make())
    fmts = fmts_of(ours)
    before = views(ours, fmts)[-1]
    qemu_img("commit", "-q", *argv, theirs[-1])
    base = argv[argv.index("-b") + 1] if "-b" in argv else None
    qcow2fast.commit(ours[-1], base=base, drop="-d" in argv or base is not None)
    assert_same_layers(ours, theirs, fmts)
    assert views([ours[-1]], fmts[-1:])[0] == before
    for a, b in zip(ours, theirs):
        assert qemu_info(a, "raw" if a.endswith(".raw") else "qcow2")["virtual-size"] == \
            qemu_info(b, "raw" if b.endswith(".raw") else "qcow2")["virtual-size"]
    if "snapshot-top" in case:      # the snapshot is kept as it was
        assert qemu_raw(ours[-1], snapshot="s1") == qemu_raw(theirs[-1], snapshot="s1")
    elif not argv and fmts[-1] == "qcow2" and "0.10" not in str(make()[-1].opts):
        # qemu's complete reset of the emptied top, byte for byte
        with open(ours[-1], "rb") as f, open(theirs[-1], "rb") as g:
            assert f.read() == g.read()


def test_commit_progress_and_nothing_else_written(tmp_path):
    paths = build_chain(str(tmp_path), chain_4())
    stamps = {p: os.stat(p).st_mtime_ns for p in paths}
    seen = []
    qcow2fast.commit(paths[-1], base="l1.qcow2", drop=True,
                     progress=lambda done, total: seen.append((done, total)))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 0
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    changed = [os.path.basename(p) for p in paths if os.stat(p).st_mtime_ns != stamps[p]]
    assert changed == ["l1.qcow2"]


def test_commit_bad_input(tmp_path):
    paths = build_chain(str(tmp_path), chain_4())
    with pytest.raises(InvalidArgumentError, match="Did not find 'nothere' in the backing"):
        qcow2fast.commit(paths[-1], base="nothere")
    with pytest.raises(InvalidArgumentError, match="does not have a backing file"):
        qcow2fast.commit(paths[0])
    with pytest.raises(InvalidArgumentError, match="drop=True"):
        qcow2fast.commit(paths[-1], base="l1.qcow2")
    with pytest.raises(InvalidArgumentError, match="Invalid cache option: bogus"):
        qcow2fast.commit(paths[-1], cache="bogus")
    os.rename(paths[1], paths[1] + ".gone")
    with pytest.raises(OSError, match="l1.qcow2"):
        qcow2fast.commit(paths[-1])
    os.rename(paths[1] + ".gone", paths[1])
    # Nothing was written by the failed attempts.
    for p in paths:
        qemu_check(p)
    assert qemu_img("compare", paths[-1], build_chain(str(tmp_path / "again"),
                                                      chain_4())[-1]).returncode == 0


class Stop(Exception):
    pass


def test_commit_interrupted_keeps_the_data(tmp_path):
    """Interrupted while copying: every layer checks clean (leaks allowed)
    and the top still shows its data; run again, the commit completes."""
    paths = build_chain(str(tmp_path), chain_4())
    before = views([paths[-1]], ["qcow2"])[0]
    calls = []

    def stop_midway(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        qcow2fast.commit(paths[-1], progress=stop_midway)
    for p in paths:
        assert not qemu_check(p, expect_clean=False).get("corruptions")
    assert views([paths[-1]], ["qcow2"])[0] == before
    qcow2fast.commit(paths[-1])
    assert views([paths[-1]], ["qcow2"])[0] == before
    qemu_check(paths[-1])


class CrashAfter:
    """A file that stops writing after ``n`` writes (a power loss between
    barriers: what was written before the last barrier is on disk)."""

    def __init__(self, f, n):
        self.f, self.n = f, n

    def pwrite(self, data, off):
        if self.n == 0:
            raise Stop
        self.n -= 1
        return self.f.pwrite(data, off)

    def truncate(self, size):
        self.pwrite(b"", 0)
        self.f.truncate(size)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("steps", range(5))
def test_empty_interrupted_is_consistent(tmp_path, steps):
    """The complete reset of the emptied top stopped after each step: the
    image checks clean (leaks allowed) and shows its backing file's data."""
    paths = build_chain(str(tmp_path), chain_2())
    qcow2fast.commit(paths[-1], drop=True)
    before = views([paths[-1]], ["qcow2"])[0]
    f = File(paths[-1], writable=True)
    try:
        if steps < 4:
            with pytest.raises(Stop):
                empty._reset(CrashAfter(f, steps), sync=True)
        else:
            assert empty._reset(CrashAfter(f, steps), sync=True)
    finally:
        f.close()
    result = qemu_check(paths[-1], expect_clean=False)
    assert result["exit_code"] in (0, 3) and not result.get("corruptions"), result
    assert views([paths[-1]], ["qcow2"])[0] == before


def test_commit_in_small_windows(tmp_path, monkeypatch):
    """The chain resolved a few MiB at a time gives the same result."""
    from qcow2fast.ops import layers
    monkeypatch.setattr(layers, "WINDOW", 4 * MiB)
    ours, theirs = twin(str(tmp_path), chain_4())
    qemu_img("commit", "-q", theirs[-1])
    qcow2fast.commit(ours[-1])
    assert_same_layers(ours, theirs, ["qcow2"] * 4)


def test_commit_base_that_cannot_grow(tmp_path):
    """A base with 512-byte clusters cannot reach a huge top's size: the
    error names the base and the field, and nothing is written."""
    base = qemu_create(tmp_path / "base.qcow2", MiB, cluster_size=512)
    top = qemu_create(tmp_path / "top.qcow2", 1 << 40, backing="base.qcow2")
    qemu_io(top, "write -P 3 0 64k")
    before = [open(p, "rb").read() for p in (base, top)]
    with pytest.raises(InvalidArgumentError, match="base.qcow2: size: cannot grow"):
        qcow2fast.commit(top)
    assert [open(p, "rb").read() for p in (base, top)] == before
