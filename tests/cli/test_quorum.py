"""qemu's quorum driver (host/quorum.py): a qcow2 or raw image kept in
several files that vote on reads -- opened by json: names side by side with
qemu-img 7.2 (info, convert, compare, map: same output and status), writes
reaching every child, and the voting itself on files made to disagree."""

import json
import shutil

import pytest

from qcow2fast._ext.fileio import File
from qcow2fast.host.file import zero
from qcow2fast.host.quorum import Quorum, QuorumSpec
from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import qemu_create, qemu_img, qemu_io

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def quorum(paths, threshold, **options):
    return {"driver": "quorum", "vote-threshold": threshold,
            "children": [{"driver": "file", "filename": str(p)} for p in paths], **options}


def name(node):
    return "json:" + json.dumps(node)


def same(capsys, *argv):
    """Run qemu-img and qcow2fast with ``argv``: (status, stdout, stderr) equal."""
    want = qemu_img(*argv, check=False)
    status, out, err = cli(capsys, *argv)
    assert (status, out, err.replace("qcow2fast: ", "qemu-img: ")) == \
        (want.returncode, want.stdout_text, want.stderr_text), argv
    return status, out


@pytest.fixture
def copies(tmp_path):
    """Three identical qcow2 files holding 1 MiB of data (over a backing
    file named relative to them), and the host offset of that data."""
    qemu_create(tmp_path / "base.qcow2", 4 * MiB)
    first = tmp_path / "c0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(first))
    qemu_io(first, "write -P 5 0 1M")
    for k in (1, 2):
        shutil.copyfile(first, tmp_path / f"c{k}.qcow2")
    data = [e for e in json.loads(qemu_img("map", "--output=json", str(first)).stdout_text)
            if e["data"]][0]["offset"]
    return [tmp_path / f"c{k}.qcow2" for k in range(3)], data


def spoil(path, at):
    """Other bytes in one 4 KiB of a child (a data cluster's)."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\x99" * 4096)


@pytest.mark.parametrize("layout", ["qcow2", "probed", "raw", "quorum"])
def test_info_as_qemu(capsys, copies, layout):
    q = quorum(copies[0], 2)
    node = {"qcow2": {"driver": "qcow2", "file": q}, "probed": {"file": q},
            "raw": {"driver": "raw", "file": q}, "quorum": q}[layout]
    for output in ("human", "json"):
        status, out = same(capsys, "info", f"--output={output}", name(node))
        assert status == 0 and "quorum" in out


def test_reads_vote_as_qemu(capsys, tmp_path, copies):
    """One child of three disagrees in a data cluster: with two votes
    needed the majority's bytes are read; with three, open and info still
    work and reading that cluster fails (compare's status and message as
    qemu's)."""
    paths, data = copies
    spoil(paths[0], data + 65536)
    for threshold in (2, 3):
        img = name({"driver": "qcow2", "backing": None, "file": quorum(paths, threshold)})
        same(capsys, "info", img)
        status, _ = same(capsys, "compare", "-f", "qcow2", "-F", "qcow2", img, str(paths[1]))
        assert status == (0 if threshold == 2 else 4)
        qemu_out, our_out = tmp_path / "qemu.raw", tmp_path / "ours.raw"
        want = qemu_img("convert", "-O", "raw", img, str(qemu_out), check=False)
        status, _, _ = cli(capsys, "convert", "-O", "raw", img, str(our_out))
        assert status == want.returncode == (0 if threshold == 2 else 1)
        if threshold == 2:
            assert our_out.read_bytes() == qemu_out.read_bytes()


def test_fifo_reads_the_first_child(capsys, tmp_path, copies):
    paths, data = copies
    spoil(paths[0], data)
    img = name({"driver": "qcow2", "backing": None,
                "file": quorum(paths[:2], 1, **{"read-pattern": "fifo"})})
    same(capsys, "compare", "-f", "qcow2", "-F", "qcow2", img, str(paths[0]))
    same(capsys, "compare", "-f", "qcow2", "-F", "qcow2", img, str(paths[1]))


def test_writes_reach_every_child_as_qemu_writes_them(capsys, tmp_path, copies):
    """snapshot -c and resize through the node (the files grow): both
    children end byte-identical, check clean, and equal to what qemu-img
    made of copies of them."""
    paths, _ = copies
    theirs = [tmp_path / f"q{k}.qcow2" for k in (0, 1)]
    for p, q in zip(paths, theirs):
        shutil.copyfile(p, q)
    for children, tool in ((paths[:2], cli), (theirs, None)):
        img = name({"driver": "qcow2", "backing": None, "file": quorum(children, 2)})
        for argv in (("snapshot", "-c", "s1", img), ("resize", img, "+64M")):
            if tool is None:
                qemu_img(*argv)
            else:
                assert tool(capsys, *argv)[0] == 0
        a, b = (c.read_bytes() for c in children)
        assert a == b
        assert qemu_img("check", str(children[0]), check=False).returncode == 0
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(paths[0]),
                    str(theirs[0])).returncode == 0
    for p, q in zip(paths[:2], theirs):
        assert qemu_img("snapshot", "-l", str(p)).stdout_text.split()[:10] == \
            qemu_img("snapshot", "-l", str(q)).stdout_text.split()[:10]


@pytest.mark.parametrize("options", [
    {"vote-threshold": 0}, {"vote-threshold": 4}, {"vote-threshold": "x"},
    {"read-pattern": "x"}, {"foo": 1}, {"children": []},
])
def test_bad_options_as_qemu(capsys, copies, options):
    node = {**quorum(copies[0], 2), **options}
    status, _ = same(capsys, "info", name({"driver": "qcow2", "backing": None, "file": node}))
    assert status == 1


def test_children_of_other_sizes_and_relative_names_as_qemu(capsys, tmp_path, copies):
    paths, _ = copies
    (tmp_path / "short.qcow2").write_bytes(paths[2].read_bytes()[:-512])
    same(capsys, "info", name({"driver": "qcow2", "backing": None,
                               "file": quorum([paths[0], tmp_path / "short.qcow2"], 1)}))
    # a backing file named relative to an image on a quorum node: no directory
    status, _ = same(capsys, "map", name({"driver": "qcow2", "file": quorum(paths, 2)}))
    assert status == 1


def test_a_failed_child_has_no_vote_and_rewrite_mends_the_losers(tmp_path):
    """A child whose read fails does not count; with rewrite-corrupted the
    children that lost a sector's vote are rewritten with the winner."""
    blobs = [bytearray(b"A" * 4096) for _ in range(3)]
    blobs[1][512:1024] = b"B" * 512
    paths = []
    for k, blob in enumerate(blobs):
        paths.append(tmp_path / f"f{k}")
        paths[-1].write_bytes(blob)

    class Failing:
        def preadinto(self, buf, off):
            raise OSError(5, "unreadable")
    files = [File(str(p), writable=True) for p in paths]
    q = Quorum(QuorumSpec("q", tuple(map(str, paths)), 2, rewrite=True), files, True, zero)
    buf = bytearray(4096)
    q.readinto(buf, 0)
    assert buf == b"A" * 4096
    assert paths[1].read_bytes() == b"A" * 4096         # mended
    q.write_zeroes(1024, 1024)                          # (every child)
    q.flush()
    assert {p.read_bytes()[1000:2100] for p in paths} == {b"A" * 24 + bytes(1024) + b"A" * 52}
    q.files = [Failing(), files[1], files[2]]
    q.readinto(buf, 0)                                   # two readable children agree
    q.files = [Failing(), Failing(), files[2]]
    with pytest.raises(OSError, match="unreadable"):
        q.readinto(buf, 0)
    for f in files:
        f.close()
