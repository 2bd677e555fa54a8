"""``qcow2fast resize`` and ``qcow2fast amend`` against qemu-img 7.2: the
same arguments on copies of one image give the same output, messages (the
program name aside) and exit status."""

import shutil

import pytest

from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import (MiB, qemu_check, qemu_create, qemu_img, qemu_info, qemu_io,
                                     qemu_raw_filled)

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


def _amend_progress_pair(tmp_path, capsys, options, make):
    """amend -p OPTIONS on two copies of the image ``make(path)`` builds:
    qemu-img's stdout, byte for byte (its walks' and L1 entries' steps,
    each operation projected over those to come), and a clean check."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "qemu.qcow2"
    make(ours)
    shutil.copy(ours, theirs)
    q = qemu_img("amend", "-p", "-o", options, theirs)
    status, out, err = cli(capsys, "amend", "-p", "-o", options, ours)
    assert (status, err) == (q.returncode, q.stderr_text) == (0, "")
    assert out == q.stdout_text, options
    qemu_check(ours)
    return out


def test_amend_progress_of_refcount_walks_is_qemus(tmp_path, capsys):
    def make(path):
        qemu_create(path, 64 << 20)
        qemu_io(path, "write -P 1 0 8M")
    out = _amend_progress_pair(tmp_path, capsys, "refcount_bits=64", make)
    assert out.startswith("    (0.00/100%)\r") and out.endswith("    (100.00/100%)\r\n")


def test_amend_progress_goes_back_with_an_extra_walk(tmp_path, capsys):
    """qemu-iotests 112: the new table needs a new block, so the width
    change walks the old table four times, not three: 66.67 -> 50.00."""
    def make(path):
        qemu_create(path, 64 << 10, refcount_bits=1, cluster_size=512)
        qemu_io(path, f"write 0 {58 * 512}")
    out = _amend_progress_pair(tmp_path, capsys, "refcount_bits=64", make)
    assert "    (66.67/100%)\r    (50.00/100%)\r" in out


@pytest.mark.parametrize("snapshot", [False, True])
def test_amend_progress_of_a_downgrade_is_qemus(tmp_path, capsys, snapshot):
    """qemu-iotests 061: one step per L1 entry (the snapshot's too)."""
    def make(path):
        qemu_create(tmp_path / "base.qcow2", 4 << 30)
        qemu_create(path, 4 << 30, backing=tmp_path / "base.qcow2")
        qemu_io(path, *(f"write -z {g}G 64k" for g in range(4)))
        if snapshot:
            qemu_img("snapshot", "-c", "foo", path)
    out = _amend_progress_pair(tmp_path, capsys, "compat=0.10", make)
    assert out.count("/100%)") == (18 if snapshot else 10)


@pytest.mark.parametrize("options", ["compat=1.1,refcount_bits=64", "compat=0.10,refcount_bits=16"])
def test_amend_progress_of_two_operations_is_qemus(tmp_path, capsys, options):
    """Two operations: the first one's work projected over both."""
    upgrade = options.startswith("compat=1.1")
    def make(path):
        qemu_create(path, 64 << 20, **({"compat": "0.10"} if upgrade else {"refcount_bits": 8}))
        qemu_io(path, "write -P 1 0 8M", *([] if upgrade else ["write -z 16M 64k"]))
    _amend_progress_pair(tmp_path, capsys, options, make)


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_preallocation_over_a_backing_file_with_subclusters(tmp_path, capsys, mode):
    """qemu-iotests 271: with extended L2 entries, create may preallocate
    over a backing file (the clusters have no subcluster allocated, so the
    backing file shows through) and a grow reads zeros past the old end;
    without them qemu's refusal."""
    base = qemu_raw_filled(tmp_path / "base.raw", MiB, 0xff)
    views = []
    for name in ("ours", "qemu"):
        path = tmp_path / f"{name}.qcow2"
        args = ["-q", "-f", "qcow2", "-o", f"extended_l2=on,preallocation={mode}", "-F", "raw",
                "-b", str(base), str(path), "512k"]
        if name == "ours":
            assert cli(capsys, "create", *args)[0] == 0
            assert cli(capsys, "resize", str(path), "1M")[0] == 0
        else:
            qemu_img("create", *args)
            qemu_img("resize", path, "1M")
        qemu_io(path, "read -P 0xff 0 512k", "read -P 0 512k 512k")
        views.append((qemu_img("map", path).stdout_text.replace(name, "X"),
                      qemu_img("check", path).returncode))
    assert views[0] == views[1]
    refused = tmp_path / "refused.qcow2"
    args = ["-f", "qcow2", "-o", f"preallocation={mode}", "-F", "raw", "-b", str(base),
            str(refused), "512k"]
    want = qemu_img("create", *args, check=False)
    status, _, err = cli(capsys, "create", *args)
    assert status == want.returncode == 1
    assert err.split(": ", 2)[-1] == want.stderr_text.split(": ", 2)[-1]
