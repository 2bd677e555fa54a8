"""The command line on images with an external data file: info, map,
check, measure, compare, create and convert print what qemu-img 7.2
prints (run side by side, in the images' directory so that relative
names mean the same to both)."""

import os

import pytest

from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import qemu_create, qemu_img, qemu_io, qemu_raw

pytestmark = pytest.mark.qemu
MiB = 1 << 20


@pytest.fixture
def images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qemu_create("n.qcow2", 4 * MiB, data_file="n.raw")
    qemu_io("n.qcow2", "write -P 1 0 1M", "write -z 2M 64k", "discard 64k 64k")
    qemu_create("r.qcow2", 4 * MiB, data_file="r.raw", data_file_raw="on", extended_l2="on")
    qemu_io("r.qcow2", "write -P 2 1k 3k", "write -z 1M 64k", "discard 2M 128k")
    return ["n.qcow2", "r.qcow2"]


@pytest.mark.parametrize("argv", [["info"], ["info", "--output=json"], ["map"],
                                  ["map", "--output=json"], ["check"],
                                  ["check", "--output=json"]])
def test_output_as_qemu(images, capsys, argv):
    for name in images:
        want = qemu_img(*argv, name, check=False)
        status, out, _ = cli(capsys, *argv, name)
        assert (status, out) == (want.returncode, want.stdout_text), name


def test_image_opts_override(images, capsys):
    os.rename("n.raw", "moved.raw")
    opts = "driver=qcow2,file.filename=n.qcow2,data-file.filename=moved.raw"
    for argv in (["map", "--image-opts", opts], ["check", "--image-opts", opts]):
        want = qemu_img(*argv, check=False)
        status, out, _ = cli(capsys, *argv)
        assert (status, out) == (want.returncode, want.stdout_text)
    status, _, err = cli(capsys, "map", "n.qcow2")          # the named file is missing
    assert status == 1 and "data_file" in err and "n.raw" in err
    # info does no I/O on the data: it still describes the image (as qemu)
    status, out, _ = cli(capsys, "info", "n.qcow2")
    assert status == 0 and out == qemu_img("info", "n.qcow2").stdout_text


def test_create_and_convert_as_qemu(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with open("src.raw", "wb") as f:
        f.truncate(8 * MiB)
        f.write(b"s" * MiB)
        f.seek(5 * MiB)
        f.write(b"t" * 70000)
    for opts in ("data_file={}A.raw", "data_file={}B.raw,data_file_raw=on",
                 "data_file={}C.raw,preallocation=falloc,cluster_size=4k"):
        status, out, _ = cli(capsys, "create", "-f", "qcow2", "-o", opts.format("o"),
                             "o.qcow2", "3M")
        want = qemu_img("create", "-f", "qcow2", "-o", opts.format("q"), "q.qcow2", "3M")
        assert status == 0
        assert out.replace("=o", "=q").replace("o.qcow2", "q.qcow2") == \
            want.stdout_text.replace("=o", "=q")
        assert qemu_img("map", "--output=json", "o.qcow2").stdout_text == \
            qemu_img("map", "--output=json", "q.qcow2").stdout_text.replace("qA", "oA")
        qemu_img("check", "o.qcow2")
    for opts in ("data_file_raw=on", "data_file=x.raw,compat=0.10"):
        want = qemu_img("create", "-f", "qcow2", "-o", opts, "e.qcow2", "1M", check=False)
        status, _, err = cli(capsys, "create", "-f", "qcow2", "-o", opts, "e.qcow2", "1M")
        assert status == want.returncode == 1
        # qemu's message after the program's name ("qemu-img: e.qcow2: ...")
        assert err.split(": ", 1)[1] == want.stderr_text.split(": ", 1)[1]
    # convert -o data_file=...,data_file_raw=on: the data file is the disk
    status, _, _ = cli(capsys, "convert", "-O", "qcow2", "-o", "data_file=cv.raw,data_file_raw=on",
                       "src.raw", "cv.qcow2")
    assert status == 0
    qemu_img("convert", "-O", "qcow2", "-o", "data_file=qcv.raw,data_file_raw=on", "src.raw",
             "qcv.qcow2")
    assert qemu_img("compare", "src.raw", "cv.raw").returncode == 0
    assert qemu_img("compare", "cv.qcow2", "qcv.qcow2").returncode == 0
    qemu_img("check", "cv.qcow2")
    assert qemu_raw("cv.qcow2") == open("src.raw", "rb").read()
    for argv in (["compare", "cv.qcow2", "src.raw"], ["compare", "cv.qcow2", "n.qcow2"]
                 if os.path.exists("n.qcow2") else ["compare", "cv.qcow2", "qcv.qcow2"],
                 ["measure", "-O", "qcow2", "-o", "data_file=m.raw", "src.raw"],
                 ["measure", "--output=json", "-O", "qcow2", "cv.qcow2"]):
        want = qemu_img(*argv, check=False)
        status, out, _ = cli(capsys, *argv)
        assert (status, out) == (want.returncode, want.stdout_text), argv
    # compressed output with a data file: refused, as qemu (exit 1)
    want = qemu_img("convert", "-c", "-O", "qcow2", "-o", "data_file=z.raw", "src.raw",
                    "z.qcow2", check=False)
    status, _, err = cli(capsys, "convert", "-c", "-O", "qcow2", "-o", "data_file=y.raw",
                         "src.raw", "y.qcow2")
    assert status == want.returncode == 1 and "Operation not supported" in err
    # internal snapshots are refused
    want = qemu_img("snapshot", "-c", "s", "qcv.qcow2", check=False)
    status, _, err = cli(capsys, "snapshot", "-c", "s", "cv.qcow2")
    assert status == want.returncode == 1
    assert err.split(": ", 1)[1] == want.stderr_text.split(": ", 1)[1]


def test_amend(images, capsys):
    """qemu-img amend renames the data file; a downgrade is refused."""
    want = qemu_img("amend", "-o", "compat=0.10", "r.qcow2", check=False)
    status, _, err = cli(capsys, "amend", "-o", "compat=0.10", "n.qcow2")
    assert status == want.returncode == 1
    assert err.split(": ", 1)[1] == want.stderr_text.split(": ", 1)[1]
    status, _, _ = cli(capsys, "amend", "-o", "data_file=n2.raw", "n.qcow2")
    assert status == 0
    qemu_img("amend", "-o", "data_file=r2.raw", "r.qcow2")
    os.rename("n.raw", "n2.raw")
    os.rename("r.raw", "r2.raw")
    for name in images:
        assert "data file: " + name[0] + "2.raw" in qemu_img("info", name).stdout_text
        qemu_img("check", name)
        status, out, _ = cli(capsys, "map", name)
        assert (status, out) == (0, qemu_img("map", name).stdout_text)


def test_amend_data_file_raw_as_qemu(tmp_path, monkeypatch, capsys):
    """data_file_raw=on where it is on already does nothing, =off clears the
    bit (the L2 tables alone then say where data is), =on again is refused:
    the same statuses, messages and header as qemu-img's on a copy."""
    monkeypatch.chdir(tmp_path)
    for name in ("ours", "qemu"):
        qemu_create(f"{name}.qcow2", 4 * MiB, data_file=f"{name}.raw", data_file_raw="on")
        qemu_io(f"{name}.qcow2", "write -P 3 0 128k")
    for value, raw_after in (("on", True), ("off", False), ("on", False)):
        want = qemu_img("amend", "-o", f"data_file_raw={value}", "qemu.qcow2", check=False)
        status, _, err = cli(capsys, "amend", "-o", f"data_file_raw={value}", "ours.qcow2")
        assert status == want.returncode, value
        assert err.split(": ", 1)[-1] == want.stderr_text.split(": ", 1)[-1], value
        info = [qemu_img("info", f"{n}.qcow2").stdout_text.replace(n, "X") for n in ("ours", "qemu")]
        assert info[0] == info[1], value
        assert (f"data file raw: {str(raw_after).lower()}" in info[0]), value
    qemu_img("check", "ours.qcow2")
    assert qemu_img("compare", "ours.qcow2", "qemu.qcow2").returncode == 0


def test_amend_takes_the_data_file_name_out_and_back_as_qemu(tmp_path, monkeypatch, capsys):
    """amend -o data_file= (qemu-iotests 244, 061): the name goes, the bit
    stays, so the image opens only with a data file given; info still shows
    it as qemu-img's does; amend with --image-opts data-file.filename= puts
    a name back."""
    monkeypatch.chdir(tmp_path)
    for name in ("ours", "qemu"):
        qemu_create(f"{name}.qcow2", 4 * MiB, data_file=f"{name}.data")
        qemu_io(f"{name}.qcow2", "write -P 7 0 64k")
    assert cli(capsys, "amend", "-o", "data_file=", "ours.qcow2")[0] == 0
    qemu_img("amend", "-o", "data_file=", "qemu.qcow2")
    for name in ("ours", "qemu"):
        p = qemu_io(f"{name}.qcow2", "read -P 7 0 64k", check=False)
        assert "'data-file' is required for this image" in p.stderr_text, name
    status, out, _ = cli(capsys, "info", "ours.qcow2")
    assert (status, out.replace("ours", "X")) == \
        (0, qemu_img("info", "qemu.qcow2").stdout_text.replace("qemu", "X"))
    assert cli(capsys, "amend", "-o", "data_file=ours.data", "--image-opts",
               "file.filename=ours.qcow2,data-file.filename=ours.data")[0] == 0
    qemu_io("ours.qcow2", "read -P 7 0 64k")
    qemu_img("check", "ours.qcow2")


def test_convert_compressed_into_a_data_file_image_as_qemu(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    qemu_create("src.qcow2", 4 * MiB)
    qemu_io("src.qcow2", "write -P 0x11 1M 1M")
    args = ["-f", "qcow2", "-O", "qcow2", "-c"]
    want = qemu_img("convert", *args, "-o", "data_file=q.data", "src.qcow2", "q.qcow2",
                    check=False)
    status, _, err = cli(capsys, "convert", *args, "-o", "data_file=o.data", "src.qcow2",
                         "o.qcow2")
    assert status == want.returncode == 1
    assert err.split(": ", 1)[1] == want.stderr_text.split(": ", 1)[1]
