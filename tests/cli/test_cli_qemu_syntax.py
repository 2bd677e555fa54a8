"""What qemu-iotests caught: qemu-img's command-line syntax (options
anywhere, ``--``), its size syntax, its messages and a few behaviours, each
compared with the real qemu-img 7.2 on the same arguments."""

import os
import shutil
import subprocess
import sys

import pytest

from qcow2fast.cli import build_parser
from qcow2fast.cli.getopt import options_first
from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import (header, patch, qemu_check, qemu_create, qemu_img,
                                     qemu_info, qemu_io, qemu_map, read_at, read_extensions,
                                     write_extensions)

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def ours_as_qemu(text, *paths):
    """Our stderr with the program's name and our paths as qemu's."""
    text = text.replace("qcow2fast: ", "qemu-img: ")
    for mine, theirs in paths:
        text = text.replace(str(mine), str(theirs))
    return text


@pytest.mark.parametrize("argv,want", [
    (["create", "-f", "qcow2", "-b", "B", "I", "-F", "qcow2", "6G"],
     ["create", "-f", "qcow2", "-b", "B", "-F", "qcow2", "I", "6G"]),
    (["convert", "-O", "qcow2", "S", "-c", "D"], ["convert", "-O", "qcow2", "-c", "S", "D"]),
    (["convert", "-Oqcow2", "S", "-pc", "D"], ["convert", "-Oqcow2", "-pc", "S", "D"]),
    (["info", "x", "--output", "json"], ["info", "--output=json", "x"]),
    (["info", "x", "--out=json"], ["info", "--output=json", "x"]),       # a unique prefix
    (["info", "--", "-x", "--output=json"], ["info", "--", "-x", "--output=json"]),
    (["create", "-b", "-weird", "I"], ["create", "-b-weird", "I"]),      # a value, not an option
    (["map", "x", "--max-length", "-1"], ["map", "--max-length=-1", "x"]),
    (["--debug", "check", "x", "-q"], ["--debug", "check", "-q", "x"]),
])
def test_options_permuted_as_getopt(argv, want):
    assert options_first(build_parser(), argv) == want


def test_create_and_convert_with_options_after_operands(capsys, tmp_path):
    """The issue's examples: both run and give what qemu-img gives."""
    base = qemu_create(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 7 0 1M")
    for tool in ("ours", "qemu"):
        img, dst = tmp_path / f"{tool}.qcow2", tmp_path / f"{tool}-c.qcow2"
        args = ["create", "-f", "qcow2", "-b", str(base), str(img), "-F", "qcow2", "6G"]
        conv = ["convert", "-O", "qcow2", str(base), "-c", str(dst)]
        if tool == "ours":
            assert cli(capsys, *args)[0] == 0 and cli(capsys, *conv)[0] == 0
        else:
            qemu_img(*args)
            qemu_img(*conv)
    assert qemu_info(tmp_path / "ours.qcow2") == {
        **qemu_info(tmp_path / "qemu.qcow2"), "filename": str(tmp_path / "ours.qcow2"),
        "actual-size": qemu_info(tmp_path / "ours.qcow2")["actual-size"]}
    theirs = qemu_map(tmp_path / "qemu-c.qcow2")
    assert qemu_map(tmp_path / "ours-c.qcow2") == theirs     # compressed: no host offsets
    assert [e for e in theirs if e["data"]] and not [e for e in theirs if "offset" in e]
    qemu_check(tmp_path / "ours-c.qcow2")
    qemu_img("compare", tmp_path / "ours-c.qcow2", tmp_path / "qemu-c.qcow2")


@pytest.mark.parametrize("size", ["1234", "0x1000", "0X10", "0x", "1.5k", "1.5", ".5k", "1e3",
                                  "12 ", "12B", "0x1.8k", "1k5", "+5", "1.k", "1.", "1.3333k",
                                  "8E", "9223372036854775808", "18446744073709551616",
                                  "--", "-1024"])
def test_sizes_as_qemu(capsys, tmp_path, size):
    """Sizes as qemu_strtosz reads them; create's line and messages as qemu's."""
    args = ["create", "-f", "raw"]
    ours, theirs = tmp_path / "a.raw", tmp_path / "b.raw"
    tail = ["--", size] if size.startswith("-") and size != "--" else [size]
    status, out, err = cli(capsys, *args, ours, *tail)
    q = qemu_img(*args, theirs, *tail, check=False)
    assert (status, out.replace(str(ours), str(theirs)), ours_as_qemu(err, (ours, theirs))) == \
        (q.returncode, q.stdout_text, q.stderr_text)


@pytest.mark.parametrize("opts,size", [([], "1234"), (["-o", "preallocation=off"], "1M"),
                                       (["-o", "compat=v3,lazy_refcounts=on"], "1M"),
                                       (["-o", "size=2M"], None), (["-o", "size=1.5"], None),
                                       (["-o", "size=1M"], "1M"),
                                       (["-o", "nocow=on,extent_size_hint=1M"], "1M"),
                                       (["-o", "preallocation=off,extent_size_hint=0"], "64M")])
def test_create_formatting_line_as_qemu(capsys, tmp_path, opts, size):
    """The size as given (not rounded), options as given, printed before
    the image is made."""
    ours, theirs = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    tail = [size] if size else []
    status, out, err = cli(capsys, "create", "-f", "qcow2", *opts, ours, *tail)
    q = qemu_img("create", "-f", "qcow2", *opts, theirs, *tail, check=False)
    assert (status, out.replace(str(ours), str(theirs)),
            ours_as_qemu(err, (ours, theirs))) == (q.returncode, q.stdout_text, q.stderr_text)


def test_messages_start_with_the_name_run_as(tmp_path):
    """Run as ``qemu-img`` (a stand-in), messages start ``qemu-img:`` as
    qemu's own (error_get_progname: the base name of argv[0])."""
    missing = tmp_path / "missing.qcow2"
    code = ("import sys; sys.argv[0] = '/some/where/qemu-img'; "
            "from qcow2fast.cli import main; sys.exit(main())")
    p = subprocess.run([sys.executable, "-c", code, "info", str(missing)],
                       capture_output=True, text=True)
    q = qemu_img("info", missing, check=False)
    assert (p.returncode, p.stderr) == (q.returncode, q.stderr_text)


def test_compare_warns_of_the_size_only_after_the_common_part(capsys, tmp_path):
    a = qemu_create(tmp_path / "a.qcow2", 4 * MiB)
    b = qemu_create(tmp_path / "b.qcow2", 8 * MiB)
    for content in ("write -P 1 1M 4k", "write -P 1 1M 4k"):
        qemu_io(a, content)
    for path_b in (b,):
        status, out, _ = cli(capsys, "compare", a, path_b)
        q = qemu_img("compare", a, path_b, check=False)
        assert (status, out) == (q.returncode, q.stdout_text)
    qemu_io(b, "write -P 1 1M 4k")
    status, out, _ = cli(capsys, "compare", a, b)
    q = qemu_img("compare", a, b, check=False)
    assert (status, out) == (q.returncode, q.stdout_text) and "Warning" in out


def test_check_repair_clears_unknown_autoclear_bits(capsys, tmp_path):
    """check -r opens the image for writing: an auto-clear bit qemu does not
    know is cleared (qcow2.txt), known ones kept; the same bytes as qemu."""
    ours = qemu_create(tmp_path / "a.qcow2", MiB)
    theirs = tmp_path / "b.qcow2"
    patch(ours, 88, ">Q", 1 << 63 | 1 << 5)         # autoclear_features
    shutil.copy(ours, theirs)
    status, out, _ = cli(capsys, "check", "-r", "all", ours)
    q = qemu_img("check", "-r", "all", theirs, check=False)
    assert (status, out) == (q.returncode, q.stdout_text)
    assert read_at(ours, 88, ">Q") == read_at(theirs, 88, ">Q") == (0,)
    status, _, _ = cli(capsys, "check", ours)          # without -r: nothing written
    patch(ours, 88, ">Q", 1 << 63)
    cli(capsys, "check", ours)
    assert read_at(ours, 88, ">Q") == (1 << 63,)


@pytest.mark.parametrize("table", [b"", b"\x00\x3fTest feature",
                                   b"\x00\x3dtest1" + bytes(41) + b"\x00\x3etest2" + bytes(41)])
def test_unknown_incompatible_features_said_as_qemu(capsys, tmp_path, table):
    """Named from the image's feature table in its order (a last partial
    entry zero-padded), the rest as one hex mask."""
    p = qemu_create(tmp_path / "a.qcow2", MiB)
    patch(p, 72, ">Q", 0x7 << 61)                   # incompatible_features
    exts = [(k, d) for k, d in read_extensions(p)[0] if k != 0x6803f857]
    if table:
        exts.append((0x6803f857, table))
    write_extensions(p, exts)
    status, _, err = cli(capsys, "info", p)
    q = qemu_img("info", p, check=False)
    assert (status, ours_as_qemu(err)) == (q.returncode, q.stderr_text)


def test_backing_loops_as_qemu(capsys, tmp_path):
    """rebase -u may name the image itself (qemu does not look); info
    --backing-chain then says it loops, with qemu's message."""
    ours, theirs = (qemu_create(tmp_path / n, MiB) for n in ("a.qcow2", "b.qcow2"))
    assert cli(capsys, "rebase", "-u", "-b", ours, "-F", "qcow2", ours)[0] == 0
    qemu_img("rebase", "-u", "-b", theirs, "-F", "qcow2", theirs)
    assert header(ours)["backing_file_offset"] == header(theirs)["backing_file_offset"]
    status, out, err = cli(capsys, "info", "--backing-chain", ours)
    q = qemu_img("info", "--backing-chain", theirs, check=False)
    assert (status, out, ours_as_qemu(err, (ours, theirs))) == \
        (q.returncode, q.stdout_text, q.stderr_text)


def test_missing_image_said_as_qemu(capsys, tmp_path):
    missing = tmp_path / "nothing.qcow2"
    for command in ("info", "check", "map"):
        status, _, err = cli(capsys, command, missing)
        q = qemu_img(command, missing, check=False)
        assert (status, ours_as_qemu(err)) == (q.returncode, q.stderr_text), command
    assert os.path.exists(tmp_path) and not os.path.exists(missing)


def test_map_human_hides_allocated_zeros(capsys, tmp_path):
    """Preallocated clusters over host holes read as zeros: qemu-img map's
    human format shows them as holes (iotest 250)."""
    p = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=1M,preallocation=metadata", p,
             "64M")
    qemu_io(p, "discard 0 4M", "write 60M 4M", "write 0 4M")
    status, out, _ = cli(capsys, "map", p)
    assert (status, out) == (0, qemu_img("map", p).stdout_text)
    assert len(out.splitlines()) == 3


def test_rebase_force_share_and_commit_options(capsys, tmp_path):
    """rebase -U reads a new backing file another program writes (as
    qemu-img's); commit takes -r (checked as qemu), --image-opts, --object."""
    from tests.hardening.test_locking import qemu_io_holding
    new = qemu_create(tmp_path / "new.qcow2", MiB)
    tops = [qemu_create(tmp_path / f"{n}.qcow2", MiB) for n in ("ours", "theirs")]
    with qemu_io_holding(new):
        status, _, err = cli(capsys, "rebase", "-b", new, "-F", "qcow2", tops[0])
        q = qemu_img("rebase", "-b", new, "-F", "qcow2", tops[1], check=False)
        assert status == q.returncode == 1 and "lock" in err and "lock" in q.stderr_text
        assert cli(capsys, "rebase", "-U", "-b", new, "-F", "qcow2", tops[0])[0] == 0
        qemu_img("rebase", "-U", "-b", new, "-F", "qcow2", tops[1])
    assert qemu_info(tops[0])["full-backing-filename"] == str(new)
    status, _, err = cli(capsys, "commit", "-r", "foo", tops[0])
    q = qemu_img("commit", "-r", "foo", tops[1], check=False)
    assert (status, ours_as_qemu(err)) == (q.returncode, q.stderr_text)
    qemu_io(tops[0], "write -P 9 0 64k")
    status, out, _ = cli(capsys, "commit", "-r", "1M", "--object", "secret,id=s0,data=x",
                         "--image-opts", f"driver=qcow2,file.filename={tops[0]}")
    assert (status, out) == (0, "Image committed.\n")
    qemu_io(new, "read -P 9 0 64k")


@pytest.mark.parametrize("command", ["info", "map", "check"])
def test_json_filenames_open_as_qemu(capsys, tmp_path, command, monkeypatch):
    """A json: name of a qcow2 node on a file: the same output as qemu-img."""
    monkeypatch.chdir(tmp_path)
    qemu_create(tmp_path / "j.qcow2", MiB)
    qemu_io(tmp_path / "j.qcow2", "write -P 3 64k 64k")
    name = 'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "j.qcow2"}}'
    if command == "check":
        name = "j.qcow2"            # check names the file it checks
    status, out, err = cli(capsys, command, name)
    q = qemu_img(command, name, check=False)
    assert (status, out, ours_as_qemu(err)) == (q.returncode, q.stdout_text, q.stderr_text)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_create_takes_the_size_of_the_backing_file(capsys, tmp_path, fmt):
    """Without a size, the backing file's (raw or qcow2), printed as qemu-img."""
    base = tmp_path / f"b.{fmt}"
    qemu_img("create", "-q", "-f", fmt, base, "3M")
    ours, theirs = tmp_path / "a.qcow2", tmp_path / "c.qcow2"
    status, out, _ = cli(capsys, "create", "-f", "qcow2", "-o", f"backing_file={base}",
                         "-F", fmt, ours)
    q = qemu_img("create", "-f", "qcow2", "-o", f"backing_file={base}", "-F", fmt, theirs)
    assert (status, out.replace(str(ours), str(theirs))) == (0, q.stdout_text)
    assert qemu_info(ours)["virtual-size"] == 3 * MiB


def test_file_protocol_names_as_qemu(capsys, tmp_path, monkeypatch):
    """``file:`` names: a backing file named so (kept in the header, opened
    as the path after it), and images named so on the command line."""
    monkeypatch.chdir(tmp_path)
    base = qemu_create(tmp_path / "base.qcow2", MiB)
    qemu_io(base, "write -P 5 0 64k")
    assert cli(capsys, "create", "-q", "-f", "qcow2", "-b", f"file:{base}", "-F", "qcow2",
               "ours.qcow2")[0] == 0
    qemu_img("create", "-q", "-f", "qcow2", "-b", f"file:{base}", "-F", "qcow2", "theirs.qcow2")
    for command in ("info", "map"):
        status, out, _ = cli(capsys, command, "file:ours.qcow2")
        q = qemu_img(command, "file:theirs.qcow2")
        assert (status, out.replace("ours.qcow2", "theirs.qcow2")) == (0, q.stdout_text)
    qemu_io(tmp_path / "ours.qcow2", "read -P 5 0 64k")


def test_image_in_use_said_once_as_qemu(capsys, tmp_path):
    """An image another program writes: qemu's lock message, not wrapped
    again in "Could not open" (iotest 153)."""
    from tests.hardening.test_locking import qemu_io_holding
    p = qemu_create(tmp_path / "a.qcow2", MiB)
    other = qemu_create(tmp_path / "b.qcow2", MiB)
    with qemu_io_holding(p):
        for args in (["info", p], ["compare", p, other], ["check", p]):
            status, _, err = cli(capsys, *args)
            q = qemu_img(*args, check=False)
            assert (status, ours_as_qemu(err)) == (q.returncode, q.stderr_text), args


@pytest.mark.parametrize("args", [["create", "-f", "qcow2", "-U", "x", "1M"],
                                  ["info", "--foo", "x"], ["check", "-Z", "x"]])
def test_unknown_options_said_as_qemu(capsys, args):
    status, _, err = cli(capsys, *args)
    q = qemu_img(*args, check=False)
    assert (status, err.replace("qcow2fast", "qemu-img")) == (q.returncode, q.stderr_text)
