"""qcow2fast map and compare against qemu-img 7.2: identical output and
exit statuses."""

import pytest

import qcow2fast
from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import qemu_create, qemu_img, qemu_io

pytestmark = pytest.mark.qemu
MiB = 1 << 20


@pytest.fixture
def chain(tmp_path):
    """base (qemu: data, compressed, zero, zero+unmap) <- top (bigger; written
    by qcow2fast: partial clusters leave host holes, zero clusters,
    discards) -- everything map has to describe."""
    base = qemu_create(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 1 0 1M", "write -c -P 2 1M 64k", "write -z 2M 128k",
            "write -z -u 3M 64k")
    top = str(tmp_path / "top.qcow2")
    qcow2fast.create(top, 6 * MiB, backing_file="base.qcow2", backing_format="qcow2")
    with qcow2fast.open(top, "r+") as img:
        img.write(512 * 1024 + 100, b"t" * 5000)
        img.write(5 * MiB, b"u" * 70000)
        img.write_zeroes(1 * MiB, 64 * 1024)
        img.discard(3 * MiB, 128 * 1024)
    sparse = tmp_path / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(640 * 1024)
        f.write(b"r" * 131072)
    return {"base": base, "top": top, "raw": str(sparse)}


@pytest.mark.parametrize("which", ["base", "top", "raw"])
@pytest.mark.parametrize("window", [[], ["--start-offset=600k", "--max-length=1M"],
                                    ["--start-offset=5M"], ["--max-length=0"]])
@pytest.mark.parametrize("output", ["json", "human"])
def test_map_equals_qemu(capsys, chain, which, window, output):
    fmt = ["-f", "raw"] if which == "raw" else []
    argv = ["map", *fmt, f"--output={output}", *window, chain[which]]
    status, out, err = cli(capsys, *argv)
    q = qemu_img(*argv, check=False)
    assert (status, out) == (q.returncode, q.stdout_text), err


def test_map_preallocated_and_zero_alloc(capsys, tmp_path):
    p = str(tmp_path / "p.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", p, "3M")
    qemu_io(p, "write -P 7 100k 10k", "write -z 1M 64k")     # zero flag on allocated clusters
    status, out, _ = cli(capsys, "map", "--output=json", p)
    assert status == 0
    assert out == qemu_img("map", "--output=json", p).stdout_text


@pytest.fixture
def pairs(tmp_path):
    def img(name, size, *ops):
        p = qemu_create(tmp_path / name, size)
        if ops:
            qemu_io(p, *ops)
        return p
    d = {
        "a": img("a.qcow2", 4 * MiB, "write -P 1 0 1M"),
        "b": img("b.qcow2", 4 * MiB, "write -P 1 0 1M", "write -P 2 700001 1"),
        "big": img("big.qcow2", 5 * MiB, "write -P 1 0 1M"),
        "bigdirty": img("bd.qcow2", 5 * MiB, "write -P 1 0 1M", "write -P 3 4500000 1"),
        "zeroed": img("z.qcow2", 4 * MiB, "write -P 1 0 1M", "write -z 2M 64k"),
    }
    raw = tmp_path / "a.raw"
    qemu_img("convert", "-O", "raw", d["a"], str(raw))
    d["raw"] = str(raw)
    return d


@pytest.mark.parametrize("argv", [
    ["a", "b"], ["a", "a"], ["a", "big"], ["-s", "a", "big"], ["a", "bigdirty"],
    ["bigdirty", "a"], ["a", "zeroed"], ["-s", "a", "zeroed"], ["-s", "a", "a"],
    ["-q", "a", "b"], ["-F", "raw", "a", "raw"], ["-F", "raw", "b", "raw"],
])
def test_compare_equals_qemu(capsys, pairs, argv):
    argv = [pairs.get(a, a) for a in argv]
    status, out, _ = cli(capsys, "compare", *argv)
    q = qemu_img("compare", *argv, check=False)
    assert (status, out) == (q.returncode, q.stdout_text)


def test_compare_open_error_exits_2(capsys, pairs, tmp_path):
    status, _, err = cli(capsys, "compare", pairs["a"], str(tmp_path / "missing.qcow2"))
    assert status == 2 and "missing.qcow2" in err


def test_compare_progress_only_on_a_terminal(pairs):
    """-p draws a bar on a terminal; piped, the output is exactly qemu's."""
    import os
    import pty
    import subprocess
    import sys
    argv = [sys.executable, "-m", "qcow2fast", "compare", "-p", pairs["a"], pairs["big"]]
    piped = subprocess.run(argv, capture_output=True, text=True)
    assert piped.returncode == 0
    assert piped.stdout == "Warning: Image size mismatch!\nImages are identical.\n"
    assert piped.stderr == ""
    pid, fd = pty.fork()
    if pid == 0:                                   # child: stdout/stderr are the pty
        os.execv(sys.executable, argv)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"Images are identical." in out and b"%" in out    # the bar was drawn


def test_holes_of_a_raw_backing_file_map_as_qemu(tmp_path, capsys):
    """A hole in a raw backing file keeps its offset in map's output, as
    qemu's raw driver reports every range offset-valid (found through a
    json: backing name; a plain name maps the same)."""
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "raw", base, "4M")
    qemu_io(base, "write -P 5 0 64k", "write -P 6 2M 64k", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, top, "8M")
    qemu_io(top, "write -P 7 1M 64k")
    for out in ("human", "json"):
        want = qemu_img("map", f"--output={out}", top).stdout_text
        status, got, err = cli(capsys, "map", f"--output={out}", top)
        assert (status, got) == (0, want), err
    assert '"zero": true, "data": false, "offset": 65536}' in want   # (the json output)
