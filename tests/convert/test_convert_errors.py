"""qcow2fast convert on bad input: one-line errors with qemu-img's exit
status 1, the source offset named, no half-written output left, Ctrl-C
stops cleanly."""

import os
import resource
import signal
import subprocess
import sys
import time

import pytest

import qcow2fast
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import H_L1_TABLE_OFFSET, REPO, patch, qemu_create, qemu_img, qemu_io

pytestmark = pytest.mark.qemu
MiB = 1 << 20


@pytest.fixture
def source(tmp_path):
    p = qemu_create(tmp_path / "src.qcow2", 4 * MiB)
    qemu_io(p, "write -P 0x11 0 1M", "write -P 0x22 3M 1M")
    return p


def one_line_error(capsys, *argv):
    status, out, err = run_cli(capsys, "convert", *argv)
    assert status == 1
    assert err.startswith("qcow2fast: ") and err.count("\n") == 1, err
    return err


def leftovers(d, keep):
    return sorted(set(os.listdir(d)) - set(keep))


def test_truncated_source_names_the_offset(capsys, source, tmp_path):
    os.truncate(source, 2 * MiB)          # the clusters of 3M..4M are gone
    err = one_line_error(capsys, "-O", "qcow2", source, tmp_path / "out.qcow2")
    assert "src.qcow2" in err and "offset 0x" in err
    assert leftovers(tmp_path, ["src.qcow2"]) == []


def test_undecodable_compressed_cluster_names_source_and_offset(capsys, tmp_path):
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"compressible " * 100000)
    src = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", raw, src)
    with qcow2fast.open(src) as img:
        first = img.block_status()[0]
    assert first.kind == "compressed"
    with open(src, "r+b") as f:                      # garble the compressed data
        f.seek(0, 2)
        end = f.tell()
        f.seek(first.host_offset)
        f.write(b"\xff" * (end - first.host_offset))
    err = one_line_error(capsys, "-O", "raw", src, tmp_path / "out.raw")
    assert "c.qcow2" in err and "at offset 0x" in err and "compressed" in err
    assert leftovers(tmp_path, ["a.raw", "c.qcow2"]) == []


def test_malformed_source(capsys, source, tmp_path):
    patch(source, H_L1_TABLE_OFFSET, ">Q", 12345)
    err = one_line_error(capsys, "-O", "raw", source, tmp_path / "out.raw")
    assert "l1_table_offset" in err
    assert leftovers(tmp_path, ["src.qcow2"]) == []


def test_missing_source_and_unwritable_target(capsys, source, tmp_path):
    err = one_line_error(capsys, "-O", "qcow2", tmp_path / "nope.qcow2", tmp_path / "o")
    assert "nope.qcow2" in err
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    err = one_line_error(capsys, "-O", "qcow2", source, blocker / "out.qcow2")
    assert "out.qcow2" in err and "Not a directory" in err


@pytest.mark.parametrize("argv,needle", [
    (["-O", "vmdk"], "format 'vmdk' is not supported"),
    (["-O", "qcow2", "-o", "cluster_size=3k"], "Cluster size must be a power of two"),  # qemu's
    (["-O", "qcow2", "-o", "bogus=1"], "bogus"),
    (["-O", "raw", "-c"], "compression"),
    (["-O", "raw", "-o", "cluster_size=4k"], "Invalid parameter 'cluster_size'"),
    (["-O", "qcow2", "-S", "1000"], "sparse"),
    (["-O", "qcow2", "-m", "0"], "threads"),
    (["-O", "qcow2", "--target-is-zero"], "-n"),
    (["-O", "qcow2", "-F", "qcow2"], "-B"),
    (["-O", "qcow2", "-o", "compat=0.10,compression_type=zstd"], "compat"),
])
def test_bad_options(capsys, source, tmp_path, argv, needle):
    err = one_line_error(capsys, *argv, source, tmp_path / "out")
    assert needle in err
    assert leftovers(tmp_path, ["src.qcow2"]) == []


def test_direct_output_to_stdout_is_refused(capsys, source):
    err = one_line_error(capsys, "-O", "qcow2", "-t", "none", source, "-")
    assert "O_DIRECT" in err and "stdout" in err


@pytest.mark.parametrize("cache", ["unsafe", "none"])
def test_full_disk_leaves_no_image(source, tmp_path, cache):
    """A write that fails half way (EFBIG under RLIMIT_FSIZE, as ENOSPC
    would) is a one-line error and leaves neither the target nor a
    temporary file."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, MiB))

    p = subprocess.run([sys.executable, "-m", "qcow2fast", "convert", "-O", "qcow2", "-t", cache,
                        source, tmp_path / "out.qcow2"], capture_output=True, preexec_fn=limit,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert p.returncode == 1
    err = p.stderr.decode()
    assert err.startswith("qcow2fast: ") and err.count("\n") == 1, err
    assert "too large" in err.lower()
    assert leftovers(tmp_path, ["src.qcow2"]) == []


def _interactive_sigint():
    """SIGINT as a terminal gives it: default action, not blocked.  (Something
    earlier in a full run leaves the test process's children with SIGINT
    ignored or blocked: convert then sat in its stdin read, not interrupted.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_stops_and_removes_the_partial_output(tmp_path):
    """SIGINT while the converter waits for more input on stdin: exit 130,
    the worker pool is shut down and the temporary output removed."""
    out = tmp_path / "out.qcow2"
    conv = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "qcow2fast", "convert",
                             "-O", "qcow2", "-c", "-", out], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO),
                            preexec_fn=_interactive_sigint)
    try:
        conv.stdin.write(os.urandom(5 * MiB))     # more than one batch: the pool is busy
        conv.stdin.flush()
        while not [n for n in os.listdir(tmp_path) if n.startswith(".out.qcow2")]:
            assert conv.poll() is None, conv.stderr.read()
            time.sleep(0.05)
        conv.send_signal(signal.SIGINT)
        try:
            status = conv.wait(timeout=60)
        except subprocess.TimeoutExpired:
            conv.send_signal(signal.SIGABRT)        # faulthandler: every thread's stack
            conv.wait(timeout=30)
            raise AssertionError("convert did not stop on SIGINT:\n" +
                                 conv.stderr.read().decode(errors="replace")[-6000:]) from None
        assert status == 130
        assert b"interrupted" in conv.stderr.read()
    finally:
        if conv.poll() is None:
            conv.kill()
        conv.stdin.close()
    assert os.listdir(tmp_path) == []
