"""commit and rebase on a 64-deep chain made by qemu (cluster sizes 512 B
to 2 MiB, extended-L2, compressed and v2 layers; a qcow2 or a raw base),
each beside qemu-img commit / rebase on a copy of the same chain: every
layer the operation writes compares equal with qemu's (qemu-img compare
through its chain) and checks clean, and the top shows what it showed."""

import shutil

import pytest

import qcow2fast
from tests.helpers.chain_util import MIXED, layer_name, make_deep_chain
from tests.helpers.layers_util import assert_same_layers, views
from tests.helpers.qemu_util import qemu_img

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
