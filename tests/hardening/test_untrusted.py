"""Untrusted images (engine/untrusted.py): the file-name rules, through the
API and every subcommand, and the resource bounds: the command line run
under ``prlimit --as=1G --cpu=30`` (what OpenStack and KubeVirt give
qemu-img for uploads) on hostile images either finishes or stops with a
clear error -- never a traceback, a kill or a hang."""

import os
import shutil
import subprocess
import sys

import pytest

import qcow2fast
from qcow2fast import UntrustedImageError
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import (REPO, qemu_create, qemu_img, qemu_io,
                                     read_extensions, write_extensions)
from tests.hardening import hostile

pytestmark = pytest.mark.qemu

AS_LIMIT = 1 << 30
PRLIMIT = shutil.which("prlimit")


@pytest.fixture
def tree(tmp_path):
    """images/ (the upload's directory) with a raw file inside, and a
    secret outside it."""
    d = tmp_path / "images"
    d.mkdir()
    (tmp_path / "secret").write_bytes(b"secret" * 1000)
    qemu_img("create", "-q", "-f", "raw", str(d / "in.raw"), "1M")
    os.symlink(str(tmp_path / "secret"), str(d / "link"))
    return d


def with_backing(d, name, fmt="raw"):
    path = str(d / f"top-{abs(hash(name))}.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", fmt, path, "1M")
    return path


@pytest.mark.parametrize("name,why", [
    ("/etc/passwd", "is an absolute path"),
    ("../secret", "leaves the image's directory"),
    ("sub/../../secret", "leaves the image's directory"),
    ("link", "leaves the image's directory"),                    # a symlink out of it
    ('json:{"file.driver":"file","file.filename":"/etc/passwd"}', "protocol or json:"),
    ("nbd:localhost:10809", "protocol or json:"),
    ("file:/etc/passwd", "protocol or json:"),
])
def test_backing_names_refused(tree, name, why, capsys):
    path = with_backing(tree, name)
    with pytest.raises(UntrustedImageError) as e:
        qcow2fast.open(path, untrusted=True)
    assert why in str(e.value) and repr(name) in str(e.value)
    for argv in (["info"], ["map"], ["check"], ["measure", "-O", "qcow2"],
                 ["compare", path], ["convert", "-O", "raw"], ["dd", f"of={tree}/o.raw"]):
        tail = [f"if={path}"] if argv[0] == "dd" else [path]
        if argv[0] == "convert":
            tail.append(str(tree / "o.raw"))
        status, out, err = run_cli(capsys, argv[0], "--untrusted", *argv[1:], *tail)
        expected = 2 if argv[0] == "compare" else 1        # compare: 2 is "error"
        assert status == expected and why in err, (argv, status, err)
    assert not os.path.exists(tree / "o.raw")


@pytest.mark.parametrize("argv", [
    ["snapshot", "-l"], ["snapshot", "-c", "s1"], ["resize", None, "2M"],
    ["bitmap", "--add", None, "b0"], ["amend", "-o", "lazy_refcounts=on"],
    ["commit"], ["rebase", "-b", "in.raw", "-F", "raw"],
    ["create", "-f", "qcow2", "-b", None, "-F", "qcow2", "new.qcow2"],
], ids=lambda a: " ".join(x for x in a if x))
def test_every_command_that_writes_refuses_too(tree, argv, capsys):
    """--untrusted on the commands that change an image (or open one as a
    new image's backing file): refused before anything is written."""
    path = with_backing(tree, "../secret")
    before = open(path, "rb").read()
    argv = [path if a is None else a for a in argv]
    if None not in argv and argv[0] != "create" and path not in argv:
        argv.append(path)
    status, out, err = run_cli(capsys, argv[0], "--untrusted", *argv[1:])
    assert status == 1 and "leaves the image's directory" in err, (argv, status, err)
    assert open(path, "rb").read() == before
    assert not os.path.exists(tree / "new.qcow2")


def test_names_inside_the_directory_are_fine(tree):
    (tree / "sub").mkdir()
    os.rename(tree / "in.raw", tree / "sub" / "in.raw")
    path = with_backing(tree, "sub/in.raw")
    with qcow2fast.open(path, untrusted=True) as img:
        assert img.backing_chain[-1].endswith("in.raw")


def test_external_data_file_name_refused(tree):
    path = str(tree / "d.qcow2")
    qemu_create(path, 1 << 20)
    exts, _ = read_extensions(path)
    exts.insert(0, (0x44415441, b"/etc/passwd"))          # the external data file name
    write_extensions(path, exts)
    with pytest.raises(UntrustedImageError, match="external data file name '/etc/passwd'"):
        qcow2fast.open(path, untrusted=True)


def test_chain_depth_bounded(tree):
    from qcow2fast.engine.untrusted import MAX_UNTRUSTED_CHAIN
    prev = "in.raw"
    for i in range(MAX_UNTRUSTED_CHAIN + 1):
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", prev, "-F",
                 "raw" if i == 0 else "qcow2", str(tree / f"c{i}.qcow2"), "1M")
        prev = f"c{i}.qcow2"
    with qcow2fast.open(str(tree / prev)):            # trusted: the usual bound
        pass
    with pytest.raises(UntrustedImageError, match="deeper than"):
        qcow2fast.open(str(tree / prev), untrusted=True)


def bounded_cli(*argv, cpu=30):
    """The command line under prlimit --as=1G --cpu=N: (status, stderr)."""
    assert PRLIMIT, "prlimit (util-linux) is needed"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([PRLIMIT, f"--as={AS_LIMIT}", f"--cpu={cpu}", sys.executable, "-m",
                        "qcow2fast", *map(str, argv)], capture_output=True, env=env,
                       timeout=600)
    err = p.stderr.decode(errors="replace")
    assert p.returncode >= 0, f"killed by signal {-p.returncode}: {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    return p.returncode, err


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    return {name: make(str(d / f"{name}.qcow2")) for name, make in hostile.HOSTILE.items()}


@pytest.mark.parametrize("name", sorted(hostile.HOSTILE))
def test_hostile_images_within_bounds(bombs, name):
    path = bombs[name]
    status, err = bounded_cli("info", "--untrusted", path)
    assert status == 0, err
    status, err = bounded_cli("check", "--untrusted", path)
    assert status == 2, err                 # corrupt, said in full, within the bounds
    assert err.count("\n") <= 100010


def test_cpu_limit_is_a_clear_error(bombs):
    # 2 PiB of mapped clusters: map cannot finish; it says why it stops.
    status, err = bounded_cli("map", "--output=json", bombs["l1_bomb"], cpu=8)
    assert status == 1 and "CPU time limit of 8 s" in err, err


def test_cpu_limit_holds_through_a_long_c_call_holding_the_gil():
    """One C call that never gives up the GIL (sum over a huge range) starves
    the guard's thread and any Python signal handler: the C SIGXCPU handler
    at the lowered soft limit still says why and exits 1 (before, the
    kernel's SIGKILL at the limit ended the process without a word)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("from qcow2fast.host.limits import CpuGuard\n"
            "assert CpuGuard.install(\"qcow2fast\") is not None\n"
            "sum(range(10**13))\n")
    p = subprocess.run([PRLIMIT, "--cpu=4", sys.executable, "-c", code], capture_output=True,
                       env=env, timeout=600)
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 1, f"status {p.returncode}: {err[-2000:]}"
    assert "CPU time limit of 4 s (RLIMIT_CPU)" in err, err


def test_cpu_limit_raises_in_python_code_first():
    """Where Python code runs, the guard's thread stops the command first, as
    an error the program can handle (LimitExceededError), not an exit."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("from qcow2fast.host.limits import CpuGuard\n"
            "from qcow2fast.errors import LimitExceededError\n"
            "CpuGuard.install(\"qcow2fast\")\n"
            "try:\n"
            "    while True:\n"
            "        sum(range(1000))\n"
            "except LimitExceededError as e:\n"
            "    print('handled:', e)\n")
    p = subprocess.run([PRLIMIT, "--cpu=6", sys.executable, "-c", code], capture_output=True,
                       env=env, timeout=600)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0 and "handled: stopped: the CPU time limit of 6 s" in out, \
        (p.returncode, out, p.stderr.decode(errors="replace")[-2000:])


def test_compressed_bomb_reads_like_qemu(bombs):
    # Each cluster's stream inflates to 64 MiB: a read stops at the cluster.
    path = bombs["compressed_bomb"]
    qemu_io(path, "read -P 0 1G 64k", extra=["-r"])
    with qcow2fast.open(path, untrusted=True) as img:
        assert img.read(1 << 30, 65536) == bytes(65536)


def test_convert_fits_the_address_space_limit(tmp_path):
    src = qemu_create(tmp_path / "s.qcow2", 64 << 20)
    qemu_io(src, "write -P 7 0 32M")
    # 64 threads asked for: as many as fit in 1 GiB are used.
    status, err = bounded_cli("convert", "-m", "64", "-c", "-O", "qcow2", src,
                              tmp_path / "d.qcow2")
    assert status == 0, err
    qemu_img("compare", src, str(tmp_path / "d.qcow2"))
