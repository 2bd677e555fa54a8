"""The command line against qemu-img 7.2: same JSON, same human output,
same exit statuses, qemu-img's option syntax."""

import json
import os
import subprocess
import sys

import pytest

from qcow2fast.cli.options import cvtnum, size_to_str, split_options
from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import qemu_check, qemu_create, qemu_img, qemu_io

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def qemu_json(*args):
    return json.loads(qemu_img(*args).stdout_text)


# -- option syntax -----------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("512", 512), ("64k", 65536), ("64K", 65536), ("1M", MiB), ("1.5G", 3 << 29),
    ("2T", 2 << 40), ("1P", 1 << 50), ("1E", 1 << 60), ("0.5k", 512), ("100b", 100),
])
def test_sizes(text, value):
    assert cvtnum("size", text) == value


@pytest.mark.parametrize("text", ["", "1Q", "-5", "1.2.3G", "G", "8E", "k1"])
def test_bad_sizes(text):
    with pytest.raises(Exception) as e:
        cvtnum("image size", text)
    assert str(e.value).startswith("Invalid image size specified.")


def test_option_lists():
    assert split_options("backing_file=a,,b,cluster_size=4k") == [
        ("backing_file", "a,b"), ("cluster_size", "4k")]
    assert split_options("help") == [("help", None)]
    assert split_options("a=1,,") == [("a", "1,")]


@pytest.mark.parametrize("n,text", [(0, "0 B"), (512, "512 B"), (200704, "196 KiB"),
                                    (7372800, "7.03 MiB"), (4 * MiB, "4 MiB"),
                                    (1023 * 1024, "0.999 MiB"), (10 << 30, "10 GiB")])
def test_size_to_str_matches_qemu(n, text):
    assert size_to_str(n) == text


# -- info -----------------------------------------------------------------------------------

@pytest.fixture
def images(tmp_path):
    """A few images made by qemu: v3, v2, snapshots, a chain, compressed, dirty, raw."""
    d = tmp_path
    out = {}
    out["v3"] = qemu_create(d / "v3.qcow2", 8 * MiB)
    qemu_io(out["v3"], "write -P 1 0 1M")
    out["v2"] = qemu_create(d / "v2.qcow2", 8 * MiB, compat="0.10", cluster_size=4096)
    out["snap"] = qemu_create(d / "snap.qcow2", 4 * MiB)
    qemu_io(out["snap"], "write -P 5 0 2M")
    qemu_img("snapshot", "-c", "first", out["snap"])
    out["base"] = qemu_create(d / "base.qcow2", 8 * MiB, refcount_bits=1)
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "mid.qcow2"))
    qemu_img("create", "-f", "qcow2", "-b", str(d / "mid.qcow2"), "-F", "qcow2",
             str(d / "top.qcow2"), "10M")
    out["top"] = str(d / "top.qcow2")
    out["zstd"] = qemu_create(d / "z.qcow2", 4 * MiB, compression_type="zstd")
    out["lazy"] = qemu_create(d / "lazy.qcow2", 4 * MiB, lazy_refcounts="on")
    raw = d / "r.raw"
    raw.write_bytes(b"x" * 3 * MiB)
    out["raw"] = str(raw)
    return out


@pytest.mark.parametrize("which", ["v3", "v2", "snap", "top", "zstd", "lazy", "raw"])
def test_info_json_equals_qemu(capsys, images, which):
    path = images[which]
    status, out, err = cli(capsys, "info", "--output=json", path)
    assert status == 0, err
    assert json.loads(out) == qemu_json("info", "--output=json", path)


@pytest.mark.parametrize("which", ["v3", "v2", "snap", "top"])
def test_info_human_equals_qemu(capsys, images, which):
    status, out, _ = cli(capsys, "info", images[which])
    assert status == 0
    assert out == qemu_img("info", images[which]).stdout_text


def test_info_backing_chain(capsys, images):
    status, out, _ = cli(capsys, "info", "--backing-chain", "--output=json", images["top"])
    assert status == 0
    got = json.loads(out)
    assert len(got) == 3
    assert got == qemu_json("info", "--backing-chain", "--output=json", images["top"])


def test_info_relative_name(capsys, images, monkeypatch):
    monkeypatch.chdir(os.path.dirname(images["top"]))
    status, out, _ = cli(capsys, "info", "--output=json", "top.qcow2")
    assert status == 0
    assert json.loads(out) == qemu_json("info", "--output=json", "top.qcow2")


def test_info_image_opts(capsys, images):
    status, out, _ = cli(capsys, "info", "--output=json", "--image-opts",
                         f"driver=qcow2,file.filename={images['v3']},l2-cache-size=128k")
    assert status == 0
    assert json.loads(out)["virtual-size"] == 8 * MiB


# -- create ---------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [
    "", "cluster_size=4k", "cluster_size=512,refcount_bits=1", "compat=0.10",
    "lazy_refcounts=on,refcount_bits=64", "compression_type=zstd", "cluster_size=2M",
    "preallocation=metadata", "preallocation=falloc,cluster_size=128k",
])
def test_create_equals_qemu(capsys, tmp_path, opts):
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    extra = ["-o", opts] if opts else []
    status, out, err = cli(capsys, "create", "-f", "qcow2", *extra, ours, "100M")
    assert status == 0, err
    q = qemu_img("create", "-f", "qcow2", *extra, theirs, "100M").stdout_text
    assert out == q.replace(theirs, ours)
    qemu_check(ours)
    a = qemu_json("info", "--output=json", ours)
    b = qemu_json("info", "--output=json", theirs)
    for d in (a, b):
        d.pop("filename")
        d.pop("actual-size")
    assert a == b


def test_create_formatting_line_with_backing_and_compat(capsys, tmp_path, images):
    argv = ["create", "-f", "qcow2", "-o", "compat=0.10", "-b", images["v3"], "-F", "qcow2"]
    status, out, _ = cli(capsys, *argv, str(tmp_path / "a.qcow2"))
    assert status == 0
    q = qemu_img(*argv, str(tmp_path / "b.qcow2")).stdout_text
    assert out == q.replace("b.qcow2", "a.qcow2")


def test_create_with_backing(capsys, tmp_path, images):
    top = str(tmp_path / "new.qcow2")
    status, _, err = cli(capsys, "create", "-f", "qcow2", "-b", images["v3"], "-F", "qcow2", top)
    assert status == 0, err
    info = qemu_json("info", "--output=json", top)
    assert info["virtual-size"] == 8 * MiB
    assert info["backing-filename"] == images["v3"]
    assert info["backing-filename-format"] == "qcow2"
    qemu_check(top)
    # -u: the backing file need not exist, the size must be given.
    status, _, _ = cli(capsys, "create", "-f", "qcow2", "-u", "-b", "nowhere.qcow2", "-F",
                       "qcow2", str(tmp_path / "u.qcow2"), "1M")
    assert status == 0
    assert qemu_json("info", "--output=json", str(tmp_path / "u.qcow2"))["virtual-size"] == MiB


def test_create_option_help(capsys):
    status, out, _ = cli(capsys, "create", "-f", "qcow2", "-o", "help")
    assert status == 0
    for key in ("cluster_size", "refcount_bits", "lazy_refcounts", "compression_type"):
        assert f"  {key}=" in out


# -- errors and exit statuses ----------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["frob"], [], ["info"], ["info", "--output=yaml", "x"], ["create", "-f", "qcow2", "x"],
    ["create", "-f", "qcow2", "-o", "bogus=1", "{tmp}/x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "cluster_size=3k", "{tmp}/x.qcow2", "1M"],
    ["create", "-f", "vmdk", "{tmp}/x.vmdk", "1M"], ["create", "-f", "qcow2", "{tmp}/x", "1Q"],
    ["info", "{tmp}/does-not-exist.qcow2"], ["info", "-f", "qcow2", "{tmp}/notqcow2"],
])
def test_errors_are_one_line_exit_1(capsys, tmp_path, argv):
    """(Or two, each with the program's name, where qemu-img says two, or
    the line pointing to --help after a usage error, as qemu-img's; their
    words are compared with qemu-img's in test_cli_qemu_messages.py.)"""
    (tmp_path / "notqcow2").write_bytes(b"hello" * 100)
    status, out, err = cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert status == 1
    lines = err.splitlines()
    hint = "Try 'qcow2fast --help' for more information"
    assert err.endswith("\n") and all(ln.startswith("qcow2fast: ") for ln in lines[:1]), err
    assert all(ln.startswith("qcow2fast: ") or ln == hint for ln in lines[1:]), err
    assert len(lines) <= 2 and "Traceback" not in err


def test_entry_point_runs_as_module(tmp_path):
    p = subprocess.run([sys.executable, "-m", "qcow2fast", "create", "-f", "qcow2", "-q",
                        str(tmp_path / "m.qcow2"), "1M"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "", p.stderr
    p = subprocess.run([sys.executable, "-m", "qcow2fast", "info", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr
