"""``qcow2fast resize`` and ``qcow2fast amend`` against qemu-img 7.2: the
same arguments on copies of one image give the same output, messages (the
program name aside) and exit status."""

import shutil

import pytest

from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import qemu_check, qemu_create, qemu_img, qemu_info, qemu_io

pytestmark = pytest.mark.qemu

RESIZE_ARGS = [["2G"], ["+1G"], ["-512M"], ["--shrink", "-512M"], ["-q", "+512"], ["+100"],
               ["abc"], ["--preallocation=foo", "+1G"], ["--preallocation=metadata", "+1M"],
               ["--preallocation=metadata", "--shrink", "1M"], ["-f", "qcow2", "+0"],
               ["--shrink", "1M"]]
AMEND_ARGS = [["-o", "help"], ["-o", "compat=0.10"], ["-o", "compat=1.1"], ["-o", "compat=2"],
              ["-o", "refcount_bits=3"], ["-o", "refcount_bits=x"], ["-o", "refcount_bits=8"],
              ["-o", "lazy_refcounts=x"], ["-o", "cluster_size=4k"], ["-o", "foo=1"],
              ["-o", "encrypt.new-secret=x"], ["-o", "size=1000"], ["-o", "size=2G"],
              ["-q", "-o", "compat=0.10,refcount_bits=8"], ["-f", "raw", "-o", "size=1M"]]


def same_as_qemu(capsys, command, args, ours, theirs):
    status, out, err = cli(capsys, command, *args[:-1], ours, *args[-1:]) \
        if command == "resize" else cli(capsys, command, *args, ours)
    p = qemu_img(command, *(args[:-1] + [theirs] + args[-1:] if command == "resize"
                            else args + [theirs]), check=False)
    want_err = p.stderr_text.replace("qemu-img: ", "qcow2fast: ")
    want_err = "\n".join(line for line in want_err.splitlines()
                         if not line.startswith("Try 'qemu-img --help'"))
    assert (status, out) == (p.returncode, p.stdout_text), args
    assert err.strip() == want_err.strip(), args


def test_resize_cli_like_qemu(tmp_path, capsys):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_create(a, 1 << 30)
    qemu_io(a, "write -P 1 0 1M")
    shutil.copy(a, b)
    for args in RESIZE_ARGS:
        same_as_qemu(capsys, "resize", args, a, b)
        assert qemu_info(a)["virtual-size"] == qemu_info(b)["virtual-size"], args
    qemu_check(a)


def test_resize_cli_raw(tmp_path, capsys):
    a = tmp_path / "r.raw"
    a.write_bytes(b"x" * 4096)
    assert cli(capsys, "resize", "-f", "raw", a, "1M")[0] == 0
    assert a.stat().st_size == 1 << 20
    assert cli(capsys, "resize", "-f", "raw", "--shrink", a, "1000")[0] == 0
    assert a.read_bytes() == b"x" * 1000


def test_amend_cli_like_qemu(tmp_path, capsys):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_create(a, 1 << 20)
    qemu_io(a, "write -P 1 0 64k", "write -z 128k 64k")
    shutil.copy(a, b)
    for args in AMEND_ARGS:
        same_as_qemu(capsys, "amend", args, a, b)
        info_a, info_b = qemu_info(a), qemu_info(b)
        for info in (info_a, info_b):
            info.pop("actual-size")
            info.pop("filename")
        assert info_a == info_b, args
    qemu_check(a)


def _percent_lines(out):
    assert out.endswith("\r\n"), repr(out[-40:])
    lines = out[:-1].split("\r")[:-1]
    values = [float(ln.strip()[1:].split("/")[0]) for ln in lines]
    assert all(ln.startswith("    (") and ln.endswith("/100%)") for ln in lines), lines
    return values


def test_amend_progress_is_qemus(tmp_path, capsys):
    """amend -p prints qemu-img's progress lines on stdout: "    (NN.NN/100%)\\r"
    from 0.00 to 100.00, never going back, then a newline."""
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "qemu.qcow2")
    qemu_create(ours, 64 << 20)
    qemu_io(ours, "write -P 1 0 8M")
    shutil.copy(ours, theirs)
    q = qemu_img("amend", "-p", "-o", "refcount_bits=64", theirs)
    status, out, err = cli(capsys, "amend", "-p", "-o", "refcount_bits=64", ours)
    assert status == 0 and err == q.stderr_text == ""
    for values in (_percent_lines(q.stdout_text), _percent_lines(out)):
        assert values[0] == 0.0 and values[-1] == 100.0
        assert values == sorted(values)
    qemu_check(ours)
