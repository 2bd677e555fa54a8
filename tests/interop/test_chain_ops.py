"""commit and rebase on a 64-deep chain made by qemu (cluster sizes 512 B
to 2 MiB, extended-L2, compressed and v2 layers; a qcow2 or a raw base),
each beside qemu-img commit / rebase on a copy of the same chain: every
layer the operation writes compares equal with qemu's (qemu-img compare
through its chain) and checks clean, and the top shows what it showed.
At depth 1000 (where qemu-img takes about a minute per operation) qemu
reads the results: after commit -b into the base, the base alone shows
what the top showed; after rebase -b "", the top alone does."""

import shutil

import pytest

import qcow2fast
from tests.helpers.chain_util import MIXED, layer_name, make_deep_chain
from tests.helpers.layers_util import assert_same_layers, views
from tests.helpers.qemu_util import (MiB, qemu_check, qemu_img, qemu_info, qemu_io, qemu_map,
                                     qemu_raw)

pytestmark = pytest.mark.qemu

DEPTH = 64
TOP = layer_name(DEPTH)
MID = layer_name(DEPTH // 2)
BASE = layer_name(0)

# name: (base format, qemu-img arguments, the call doing the same, layers written)
CASES = {
    "commit": ("qcow2", ["commit", "-q", TOP],
               lambda d: qcow2fast.commit(f"{d}/{TOP}"), [DEPTH - 1, DEPTH]),
    "commit-b-base": ("qcow2", ["commit", "-q", "-b", BASE, TOP],
                      lambda d: qcow2fast.commit(f"{d}/{TOP}", base=BASE, drop=True), [0]),
    "commit-b-mid": ("qcow2", ["commit", "-q", "-b", MID, TOP],
                     lambda d: qcow2fast.commit(f"{d}/{TOP}", base=MID, drop=True),
                     [DEPTH // 2]),
    "commit-b-raw-base": ("raw", ["commit", "-q", "-b", BASE, TOP],
                          lambda d: qcow2fast.commit(f"{d}/{TOP}", base=BASE, drop=True), [0]),
    "rebase-standalone": ("qcow2", ["rebase", "-q", "-b", "", TOP],
                          lambda d: qcow2fast.rebase(f"{d}/{TOP}", ""), [DEPTH]),
    "rebase-onto-mid": ("qcow2", ["rebase", "-q", "-b", MID, "-F", "qcow2", TOP],
                        lambda d: qcow2fast.rebase(f"{d}/{TOP}", MID, backing_fmt="qcow2"),
                        [DEPTH]),
    "rebase-onto-raw-base": ("raw", ["rebase", "-q", "-b", BASE, "-F", "raw", TOP],
                             lambda d: qcow2fast.rebase(f"{d}/{TOP}", BASE, backing_fmt="raw"),
                             [DEPTH]),
}


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """The chain on each kind of base, made once: (its directory, what the
    top shows)."""
    out = {}
    for base_fmt in ("qcow2", "raw"):
        d = str(tmp_path_factory.mktemp(f"chain-{base_fmt}"))
        make_deep_chain(d, DEPTH, variants=MIXED, base_fmt=base_fmt)
        out[base_fmt] = d, views([f"{d}/{TOP}"], ["qcow2"])[0]
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_deep_mixed_chain_matches_qemu(tmp_path, chains, case):
    base_fmt, argv, call, written = CASES[case]
    made, before = chains[base_fmt]
    ours, theirs = str(tmp_path / "qf"), str(tmp_path / "qemu")
    shutil.copytree(made, ours)
    shutil.copytree(made, theirs)
    qemu_img(*argv[:-1], f"{theirs}/{TOP}")
    call(ours)
    fmts = [base_fmt if k == 0 else "qcow2" for k in written]
    assert_same_layers([f"{ours}/{layer_name(k)}" for k in written],
                       [f"{theirs}/{layer_name(k)}" for k in written], fmts)
    assert views([f"{ours}/{TOP}"], ["qcow2"])[0] == before


def test_commit_and_rebase_1000_deep(tmp_path):
    made = tmp_path / "made"
    made.mkdir()
    # 4 KiB clusters: layer k writes cluster k mod 512 (bytes k & 0xff), so
    # clusters 512-1023 are the base's (0x5a), resolved through all 1000
    # overlays.  (qemu-img convert takes a minute on this chain: the
    # expected view is built from that rule, and qemu reads the results.)
    top = make_deep_chain(made, 1000, size=4 * MiB, cs=4096)
    last = [max(k for k in range(1, 1001) if k % 512 == s) for s in range(512)]
    before = b"".join(bytes([last[s] & 0xff if s < 512 else 0x5a]) * 4096
                      for s in range(1024))
    with qcow2fast.open(top) as img:
        assert img.read(0, img.size) == before
    a, b = shutil.copytree(made, tmp_path / "a"), shutil.copytree(made, tmp_path / "b")
    qcow2fast.commit(f"{a}/{layer_name(1000)}", base=BASE, drop=True)
    assert qemu_raw(f"{a}/{BASE}") == before
    qemu_check(f"{a}/{BASE}")
    qcow2fast.rebase(f"{b}/{layer_name(1000)}", "")
    assert "backing-filename" not in qemu_info(f"{b}/{layer_name(1000)}")
    assert qemu_raw(f"{b}/{layer_name(1000)}") == before
    qemu_check(f"{b}/{layer_name(1000)}")


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_committed_zeros_unmap_the_base_as_qemu(tmp_path, base_fmt):
    """Zeros committed into a filled base free its clusters there, as
    qemu's commit job does (qemu-iotests 313): the base maps and checks as
    qemu's result does, allocated clusters included."""
    results = {}
    for who in ("qemu", "ours"):
        d = tmp_path / who
        d.mkdir()
        base, top = str(d / "base"), str(d / "top.qcow2")
        qemu_img("create", "-q", "-f", base_fmt, base, "4M")
        qemu_io(base, "write -P 1 0 4M", fmt=base_fmt)
        qemu_img("create", "-q", "-f", "qcow2", "-F", base_fmt, "-b", base, top)
        qemu_io(top, "write -z 1M 2M")
        if who == "qemu":
            qemu_img("commit", "-q", top)
        else:
            qcow2fast.commit(top)
        results[who] = ([{k: v for k, v in e.items() if k != "offset"}
                         for e in qemu_map(base, fmt=base_fmt)],
                        qemu_raw(base, fmt=base_fmt))
        if base_fmt == "qcow2":
            results[who] += (qemu_check(base)["allocated-clusters"],)
    assert results["ours"] == results["qemu"]
    assert results["ours"][0] != [{"start": 0, "length": 4 * MiB, "depth": 0, "present": True,
                                   "zero": False, "data": True}]
