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


def _bitmap_image(tmp_path, name):
    path = qemu_create(tmp_path / name, 64 * MiB)
    qemu_io(path, "write 0 1M")
    qemu_img("bitmap", "--add", path, "b0")
    qemu_img("bitmap", "--add", "-g", "512", path, "b1")
    qemu_img("bitmap", "--add", "--disable", path, "b2")
    qemu_io(path, "write 4M 64k", "write 9M 700")
    return path


def test_measure_bitmaps_size(tmp_path, capsys):
    path = _bitmap_image(tmp_path, "m.qcow2")
    crashed = qemu_create(tmp_path / "c.qcow2", 64 * MiB)
    qemu_img("bitmap", "--add", crashed, "x")
    qemu_io(crashed, "write 0 64k", "sigraise 9", check=False)       # in_use: still counted
    plain = qemu_create(tmp_path / "p.qcow2", 64 * MiB)
    for img in (path, crashed, plain):
        for opts in ([], ["-o", "cluster_size=512"], ["-o", "cluster_size=2M"],
                     ["-o", "compat=0.10"]):
            for out in ("human", "json"):
                args = ["measure", f"--output={out}", "-O", "qcow2", *opts, img]
                q = qemu_img(*args)
                status, stdout, _ = run_cli(capsys, *args)
                assert (status, stdout) == (0, q.stdout_text), args


def test_convert_bitmaps(tmp_path, capsys):
    from tests.helpers.bitmap_util import qemu_dirty_map
    path = _bitmap_image(tmp_path, "s.qcow2")
    crashed = qemu_create(tmp_path / "c.qcow2", 64 * MiB)
    qemu_img("bitmap", "--add", crashed, "x")
    qemu_img("bitmap", "--add", crashed, "y")
    qemu_io(crashed, "write 0 64k", "sigraise 9", check=False)
    qemu_img("bitmap", "--add", crashed, "ok")
    raw = str(tmp_path / "r.raw")
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    cases = [["--bitmaps", "-O", "qcow2", path], ["--bitmaps", "-O", "qcow2", "-o",
                                                  "cluster_size=4096", path],
             ["--bitmaps", "-O", "qcow2", crashed],
             ["--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", crashed],
             ["--skip-broken-bitmaps", "-O", "qcow2", path], ["--bitmaps", "-O", "raw", path],
             ["--bitmaps", "-O", "qcow2", path, path], ["--bitmaps", "-f", "raw", "-O", "qcow2",
                                                        raw]]
    for k, args in enumerate(cases):
        ours, theirs = str(tmp_path / f"o{k}.qcow2"), str(tmp_path / f"t{k}.qcow2")
        status, _, err = run_cli(capsys, "convert", *args, ours)
        q = qemu_img("convert", *args, theirs, check=False)
        assert status == q.returncode, (args, err, q.stderr_text)
        assert err.replace("qcow2fast:", "qemu-img:") == q.stderr_text, args
        if status:
            continue
        qemu_check(ours)
        assert qemu_info(ours)["format-specific"]["data"].get("bitmaps") == \
            qemu_info(theirs)["format-specific"]["data"].get("bitmaps"), args
        for b in qemu_info(ours)["format-specific"]["data"].get("bitmaps", []):
            assert qemu_dirty_map(ours, b["name"], tmp_path) == \
                qemu_dirty_map(theirs, b["name"], tmp_path), (args, b["name"])


def test_merge_from_the_layer_above_into_its_backing_file(capsys, tmp_path):
    """qemu-iotests qemu-img-bitmaps: ``bitmap --add --merge b2 -b TOP BASE b3``
    where TOP's backing file is BASE, the image being written.  The source
    is read without its backing chain, so the two opens of BASE do not
    conflict; both tools end with the same bitmap."""
    imgs = {}
    for tool in ("ours", "qemu"):
        base = qemu_create(tmp_path / f"{tool}.base", 4 * MiB)
        top = tmp_path / f"{tool}.top"
        qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        qemu_img("bitmap", "--add", top, "b2")
        qemu_io(top, "write 1M 64k")
        argv = ["bitmap", "--add", "--merge", "b2", "-b", top, "-F", "qcow2", "-f", "qcow2",
                base, "b3"]
        if tool == "ours":
            assert run_cli(capsys, *argv) == (0, "", "")
        else:
            qemu_img(*argv)
        imgs[tool] = base
    bitmaps = [qemu_info(imgs[t])["format-specific"]["data"]["bitmaps"] for t in imgs]
    assert bitmaps[0] == bitmaps[1] and bitmaps[0][0]["name"] == "b3"
    import qcow2fast
    dirty = []
    for t in imgs:
        with qcow2fast.open(str(imgs[t]), backing=False) as img:
            dirty.append(list(img.dirty_extents("b3")))
    assert dirty[0] == dirty[1] != []
