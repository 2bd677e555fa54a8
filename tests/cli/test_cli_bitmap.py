"""``qcow2fast bitmap`` against ``qemu-img bitmap`` 7.2: the same sequence of
commands on two copies of one image gives the same messages, exit
statuses and bitmaps (qemu-img info)."""

import shutil

import pytest

from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import qemu_check, qemu_create, qemu_img, qemu_info, qemu_io

pytestmark = pytest.mark.qemu
MiB = 1 << 20

# Each: the arguments, IMG standing for the image.
COMMANDS = [
    [], ["--add", "IMG"], ["-g", "4096", "--remove", "IMG", "b0"],
    ["-F", "qcow2", "--add", "IMG", "x"], ["-b", "SRC", "--add", "IMG", "x"],
    ["--add", "IMG", "b0"], ["--remove", "IMG", "nope"], ["--clear", "IMG", "nope"],
    ["--add", "-g", "256", "IMG", "x"], ["--add", "-g", "3000", "IMG", "x"],
    ["--add", "-g", "4G", "IMG", "x"], ["--add", "-g", "abc", "IMG", "x"],
    ["--enable", "--disable", "IMG", "b0"], ["--add", "--merge", "b0", "IMG", "m"],
    ["--merge", "nope", "IMG", "b0"], ["--merge", "b0", "-b", "SRC", "IMG", "newx"],
    ["--add", "-g", "2G", "IMG", "big"], ["--add", "--disable", "IMG", "dis"],
    ["--disable", "--add", "IMG", "dis2"], ["--merge", "b0", "-b", "SRC", "-F", "qcow2", "IMG", "m"],
    ["--add", "IMG", "dflt"], ["--add", "--add", "IMG", "twice"], ["--clear", "IMG", "b1"],
    ["--remove", "IMG", "b1"], ["--add", "IMG", "é-ünï"],
]


@pytest.mark.parametrize("cluster_size", [4096, 2 * MiB])
def test_bitmap_command_matches_qemu_img(tmp_path, capsys, cluster_size):
    src = qemu_create(tmp_path / "src.qcow2", 64 * MiB, cluster_size=cluster_size)
    qemu_io(src, "write 0 1M")
    qemu_img("bitmap", "--add", src, "b0")
    qemu_img("bitmap", "--add", "-g", "512", src, "b1")
    qemu_io(src, "write 4M 64k")
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    shutil.copy(src, ours)
    shutil.copy(src, theirs)
    for cmd in COMMANDS:
        status, out, err = run_cli(capsys, "bitmap",
                                   *[{"IMG": ours, "SRC": src}.get(a, a) for a in cmd])
        q = qemu_img("bitmap", *[{"IMG": theirs, "SRC": src}.get(a, a) for a in cmd],
                     check=False)
        assert status == q.returncode, (cmd, err, q.stderr_text)
        assert err.replace("qcow2fast:", "qemu-img:").replace(ours, theirs) == \
            q.stderr_text, cmd
        ours_info = qemu_info(ours)["format-specific"]["data"].get("bitmaps")
        assert ours_info == qemu_info(theirs)["format-specific"]["data"].get("bitmaps"), cmd
    qemu_check(ours)


def test_bitmap_name_too_long_and_v2(tmp_path, capsys):
    path = qemu_create(tmp_path / "a.qcow2", MiB)
    status, _, err = run_cli(capsys, "bitmap", "--add", path, "x" * 1024)
    assert status == 1
    assert err.endswith("Name length exceeds maximum (1023 characters)\n")
    status, _, err = run_cli(capsys, "bitmap", "--add", path, "x" * 1023)
    assert status == 0, err
    v2 = qemu_create(tmp_path / "v2.qcow2", MiB, compat="0.10")
    status, _, err = run_cli(capsys, "bitmap", "--add", v2, "x")
    assert status == 1 and err.endswith("Cannot store dirty bitmaps in qcow2 v2 files\n")
    qemu_check(path)
