"""convert's choices of what to write, as qemu-img 7.2 makes them (iotest
122): -S larger than a cluster, a target backing file shorter than the
disk, -n with -B, zeroing an existing target, and the messages of option
conflicts."""

import shutil

import pytest

import qcow2fast
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import qemu_create, qemu_img, qemu_io, qemu_map, qemu_raw

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def layout(path):
    """qemu-img map's extents without host offsets (laid out differently)."""
    return [{k: v for k, v in e.items() if k != "offset"} for e in qemu_map(path)]


@pytest.mark.parametrize("min_sparse", ["4k", "8k", "3k"])
def test_sparse_size_larger_than_a_cluster(tmp_path, capsys, min_sparse):
    """-S: zeros are skipped only in whole -S-aligned blocks (of -S rounded
    down to a power of two), so with 1 KiB clusters the zero clusters
    beside data in such a block are written."""
    src = qemu_create(tmp_path / "s.qcow2", 64 * MiB, cluster_size=1024)
    qemu_io(src, "write -P 0 0 64k", "write 0 1k", "write 8k 1k", "write 17k 1k",
            "write -P 0 65k 1k")
    q, f = str(tmp_path / "q.qcow2"), str(tmp_path / "f.qcow2")
    for out, run in ((q, qemu_img), (f, None)):
        argv = ["convert", "-O", "qcow2", "-o", "cluster_size=1k", "-S", min_sparse, src, out]
        if run:
            run(*argv)
        else:
            assert run_cli(capsys, *argv)[0] == 0
    assert layout(f) == layout(q)
    assert qemu_raw(f) == qemu_raw(src)


def test_backing_file_shorter_than_the_disk(tmp_path, capsys):
    """-B over a backing file shorter than the disk: nothing is written
    past its end (the target reads zeros there anyway), even for a v2
    target, which has no zero clusters."""
    base = qemu_create(tmp_path / "base.qcow2", 256 * MiB)
    top = qemu_create(tmp_path / "top.qcow2", 768 * MiB, backing=base)
    qemu_io(base, "write -P 0x11 255M 1M")
    qemu_io(top, "write -P 0x22 600M 1M")
    maps = []
    for out, ours in (("q.qcow2", False), ("f.qcow2", True)):
        argv = ["convert", "-O", "qcow2", "-B", base, "-o", "compat=0.10",
                "-o", "backing_fmt=qcow2", top, str(tmp_path / out)]
        if ours:
            assert run_cli(capsys, *argv)[0] == 0
        else:
            qemu_img(*argv)
        maps.append(layout(str(tmp_path / out)))
    assert maps[0] == maps[1]
    assert qemu_raw(str(tmp_path / "f.qcow2")) == qemu_raw(top)


def test_existing_target_with_backing_name(tmp_path, capsys):
    """-n -B: accepted (qemu takes the target's backing file to hold what
    the source's holds, and copies the source's top layer only)."""
    base = qemu_create(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 1 0 4M")
    top = qemu_create(tmp_path / "top.qcow2", 4 * MiB, backing=base)
    qemu_io(top, "write -P 2 1M 64k", "write -z 2M 64k")
    q = qemu_create(tmp_path / "q.qcow2", 4 * MiB, backing=base)
    f = str(tmp_path / "f.qcow2")
    shutil.copy(q, f)
    qemu_img("convert", "-O", "qcow2", "-B", base, "-n", top, q)
    status, out, err = run_cli(capsys, "convert", "-O", "qcow2", "-B", base, "-n", top, f)
    assert (status, out, err) == (0, "", "")
    assert layout(f) == layout(q)
    assert qemu_raw(f) == qemu_raw(q) == qemu_raw(top)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_existing_empty_target_gets_zero_clusters(tmp_path, capsys, compat):
    """-n into an empty image: the source's zeros become zero clusters on
    v3 (an L2 table is made for them, as qemu), nothing on v2."""
    src = qemu_create(tmp_path / "s.qcow2", 64 * MiB)
    q = qemu_create(tmp_path / "q.qcow2", 64 * MiB, compat=compat)
    f = str(tmp_path / "f.qcow2")
    shutil.copy(q, f)
    qemu_img("convert", "-O", "qcow2", "-n", src, q)
    assert run_cli(capsys, "convert", "-O", "qcow2", "-n", src, f)[0] == 0
    assert layout(f) == layout(q)


def test_write_zeroes_without_an_l2_table_as_qemu(tmp_path):
    """A v3 zero request where no L2 table exists yet writes zero flags, as
    qemu-io write -z (-u) does."""
    q = qemu_create(tmp_path / "q.qcow2", 4 * MiB)
    f = str(tmp_path / "f.qcow2")
    shutil.copy(q, f)
    qemu_io(q, "write -z -u 1M 128k")
    with qcow2fast.open(f, "r+") as img:
        img.write_zeroes(MiB, 128 * 1024, may_unmap=True)
    assert layout(f) == layout(q)


@pytest.mark.parametrize("argv,message", [
    (["-B", "B", "S", "S", "OUT"], "Having a backing file for the target makes no sense when "
                                   "concatenating multiple input images"),
    (["-o", "preallocation=metadata", "-n", "S", "OUT"],
     "-o has no effect when skipping image creation"),
])
def test_option_conflicts_in_qemus_words(tmp_path, capsys, argv, message):
    s = qemu_create(tmp_path / "s.qcow2", MiB)
    out = qemu_create(tmp_path / "o.qcow2", 2 * MiB)
    argv = ["convert", "-O", "qcow2"] + [{"S": s, "B": s, "OUT": out}.get(a, a) for a in argv]
    ref = qemu_img(*argv, check=False)
    status, _, err = run_cli(capsys, *argv)
    assert status == ref.returncode == 1
    assert ref.stderr_text == f"qemu-img: {message}\n"
    assert err == f"qcow2fast: {message}\n"
