"""commit and rebase on the command line: output, messages and exit
statuses beside qemu-img's on twin chains."""

import re

import pytest

from tests.helpers.cli_util import run_cli
from tests.helpers.layers_util import Layer, twin
from tests.helpers.qemu_util import MiB, qemu_img, qemu_info

pytestmark = pytest.mark.qemu

CHAIN = [Layer("base.qcow2", writes=["write -P 1 0 4M"]),
         Layer("mid.qcow2", writes=["write -P 2 1M 1M"]),
         Layer("top.qcow2", writes=["write -P 3 3M 2M", "write -z 0 64k"])]

PROGRESS = re.compile(r"    \(\d{1,3}\.\d\d/100%\)")


def both(capsys, tmp_path, command, *argv):
    """(ours, qemu's): each (status, stdout, first stderr line without the
    program name), run on twin chains in their own directories."""
    ours, theirs = twin(str(tmp_path), CHAIN)

    def fill(paths):
        d = paths[-1].rsplit("/", 1)[0]
        return [a.replace("{top}", paths[-1]).replace("{d}", d) for a in argv]

    status, out, err = run_cli(capsys, command, *fill(ours))
    q = qemu_img(command, *fill(theirs), check=False)
    qdir, mydir = theirs[-1].rsplit("/", 1)[0], ours[-1].rsplit("/", 1)[0]

    def first(text, prog):
        return text.splitlines()[0].removeprefix(prog).replace(qdir, mydir) if text else ""
    return ((status, out, first(err, "qcow2fast: ")),
            (q.returncode, q.stdout_text, first(q.stderr_text, "qemu-img: "))), ours, theirs


@pytest.mark.parametrize("argv", [
    ["{top}"], ["-q", "{top}"], ["-d", "{top}"], ["-b", "base.qcow2", "{top}"],
    ["-t", "unsafe", "-f", "qcow2", "{top}"],
    ["-b", "nothere", "{top}"], ["{d}/base.qcow2"], [], ["-t", "bogus", "{top}"],
    ["-f", "raw", "{top}"], ["{top}", "{d}/mid.qcow2"],
])
def test_commit_cli_like_qemu(capsys, tmp_path, argv):
    (mine, theirs), ours_paths, their_paths = both(capsys, tmp_path, "commit", *argv)
    assert mine == theirs
    if mine[0] == 0:
        assert qemu_img("compare", ours_paths[-1], their_paths[-1]).returncode == 0


@pytest.mark.parametrize("argv", [
    ["-b", "base.qcow2", "-F", "qcow2", "{top}"], ["-q", "-b", "", "{top}"], ["-u", "{top}"],
    ["-u", "-b", "base.qcow2", "-F", "qcow2", "{top}"], ["-t", "unsafe", "-b", "", "{top}"],
    ["{top}"], ["-b", "base.qcow2", "{top}"], ["-u", "-b", "base.qcow2", "{top}"],
    ["-b", "nothere", "-F", "qcow2", "{top}"], ["-b", "base.qcow2", "-F", "foo", "{top}"],
    ["-f", "raw", "-u", "-b", "base.qcow2", "-F", "qcow2", "{top}"], [], ["-b", "x"],
    ["-t", "bogus", "-b", "base.qcow2", "-F", "qcow2", "{top}"],
])
def test_rebase_cli_like_qemu(capsys, tmp_path, argv):
    (mine, theirs), ours_paths, their_paths = both(capsys, tmp_path, "rebase", *argv)
    assert mine == theirs
    a, b = qemu_info(ours_paths[-1]), qemu_info(their_paths[-1])
    if mine[0] == 0:
        assert a.get("backing-filename") == b.get("backing-filename")
        assert qemu_img("compare", ours_paths[-1], their_paths[-1]).returncode == 0
    else:       # nothing changed (qemu 7.2 may have copied data before failing)
        assert a.get("backing-filename") == "mid.qcow2"


@pytest.mark.parametrize("fmt", ["host_device", "file", "vmdk", "foo"])
def test_rebase_unsafe_writes_any_qemu_driver_name(capsys, tmp_path, fmt):
    """iotest 031: ``rebase -u -F host_device`` writes the names only, for
    any block driver qemu-img knows, and refuses a name it does not."""
    argv = ["-u", "-b", "/some/backing/file/path", "-F", fmt, "{top}"]
    (mine, theirs), ours, _ = both(capsys, tmp_path, "rebase", *argv)
    assert mine == theirs
    if fmt == "foo":
        assert mine[0] == 1 and mine[2] == "Invalid format name: 'foo'"
    else:
        assert mine[0] == 0
        import qcow2fast
        with qcow2fast.open(ours[-1], backing=False) as img:
            assert (img.header.backing_file, img.header.backing_format) == (
                "/some/backing/file/path", fmt)


@pytest.mark.parametrize("command,argv,last", [
    ("commit", ["-p", "{top}"], "\nImage committed.\n"),
    ("rebase", ["-p", "-b", "base.qcow2", "-F", "qcow2", "{top}"], "\n"),
    ("rebase", ["-p", "-b", "", "{top}"], "\n"),
])
def test_progress_like_qemu(capsys, tmp_path, command, argv, last):
    (mine, theirs), _, _ = both(capsys, tmp_path, command, *argv)
    for status, out, _ in (mine, theirs):
        assert status == 0
        steps, end = out.split("\r")[:-1], out.split("\r")[-1]
        assert end == last
        assert steps and all(PROGRESS.fullmatch(s) for s in steps), out
        figures = [float(s.strip()[1:].split("/")[0]) for s in steps]
        assert figures[0] == 0 and figures[-1] == 100 and figures == sorted(figures)
    # -q silences it
    (mine, theirs), _, _ = both(capsys, tmp_path / "q", command, "-q", *argv)
    assert mine[1] == theirs[1] == ""


def test_commit_cli_size_of_committed_base(capsys, tmp_path):
    chain = [Layer("base.qcow2", size=4 * MiB, writes=["write -P 1 0 4M"]),
             Layer("top.qcow2", size=12 * MiB, writes=["write -P 3 9M 1M"])]
    ours, theirs = twin(str(tmp_path), chain)
    assert run_cli(capsys, "commit", ours[-1])[0] == 0
    qemu_img("commit", theirs[-1])
    assert qemu_info(ours[0])["virtual-size"] == qemu_info(theirs[0])["virtual-size"] == 12 * MiB
    assert qemu_img("compare", ours[0], theirs[0]).returncode == 0


@pytest.mark.parametrize("argv", [
    ["-b", "base.qcow2", "-F", "qcow2", "{d}/new.qcow2"], ["-b", "base.qcow2", "{d}/new.qcow2"],
    ["-b", "nothere", "-F", "qcow2", "{d}/new.qcow2"],
    ["-u", "-b", "nothere", "-F", "qcow2", "{d}/new.qcow2"],
    ["-u", "-b", "nothere", "-F", "qcow2", "{d}/new.qcow2", "1M"],
])
def test_create_with_backing_like_qemu(capsys, tmp_path, argv):
    """create -b: the size from the backing file when none is given, and
    qemu-img 7.2's refusals (no -F, a missing backing file, -u without a
    size)."""
    (mine, theirs), ours, qemu_paths = both(capsys, tmp_path, "create", "-f", "qcow2", *argv)
    assert mine[0] == theirs[0] and mine[2] == theirs[2]
    if mine[0] == 0:
        new = [p.rsplit("/", 1)[0] + "/new.qcow2" for p in (ours[-1], qemu_paths[-1])]
        a, b = qemu_info(new[0]), qemu_info(new[1])
        for key in ("virtual-size", "backing-filename", "backing-filename-format"):
            assert a.get(key) == b.get(key), key
