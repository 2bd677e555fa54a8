"""qcow2fast dd against qemu-img dd: same output size and contents."""

import pytest

from qcow2fast.cli import main
from tests.helpers.qemu_util import qemu_check, qemu_create, qemu_img, qemu_io, qemu_info

pytestmark = pytest.mark.qemu
MiB = 1 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    p = qemu_create(tmp_path_factory.mktemp("dd") / "src.qcow2", 4 * MiB)
    qemu_io(p, "write -P 1 0 1M", "write -P 2 2M 1M", "write -P 3 3999999 1")
    return p


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("ops", [[], ["bs=3", "count=5000"], ["bs=1.5k", "count=1"],
                                 ["bs=1M", "count=9"], ["bs=1M", "skip=1"], ["bs=1M", "count=2", "skip=1"],
                                 ["bs=64k", "skip=7", "count=40"]])
def test_dd_equals_qemu(tmp_path, source, out_fmt, ops):
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    assert main(["dd", "-O", out_fmt, f"if={source}", f"of={ours}", *ops]) == 0
    qemu_img("dd", "-O", out_fmt, f"if={source}", f"of={theirs}", *ops)
    assert qemu_info(ours, out_fmt)["virtual-size"] == qemu_info(theirs, out_fmt)["virtual-size"]
    qemu_img("compare", "-f", out_fmt, "-F", out_fmt, ours, theirs)
    if out_fmt == "qcow2":
        qemu_check(ours)


@pytest.mark.parametrize("ops", [["bs=1k", "skip=5000"], ["bs=0"], ["conv=notrunc"], []])
def test_dd_errors(capsys, tmp_path, source, ops):
    argv = ["dd", *ops] if not ops else ["dd", f"if={source}", f"of={tmp_path / 'x'}", *ops]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("qcow2fast: ") and err.count("\n") == 1     # (words: test_cli_qemu_messages)
