"""Images on block devices (loop devices here): a qcow2 image living on a
device, raw and qcow2 conversions to and from one.

A device has a fixed size (st_size 0: sizes come from lseek) and holds old
data: every device here starts full of 0xee, so anything that trusted it to
read as zeros shows up in qemu-img compare.  Loop devices need root; they are
required under CI=true, as the qemu oracle is.
"""

import errno
import os
import shutil
import subprocess

import pytest

import qcow2fast
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import IN_CI, qemu_img, qemu_io

pytestmark = pytest.mark.qemu

MiB = 1 << 20
DEV_SIZE = 16 * MiB
OLD = 0xEE


@pytest.fixture
def device(tmp_path):
    """A 16 MiB loop device full of 0xee."""
    backing = tmp_path / "device.img"
    backing.write_bytes(bytes([OLD]) * DEV_SIZE)
    why = "losetup not found (util-linux)"
    if shutil.which("losetup"):
        p = subprocess.run(["losetup", "-f", "--show", str(backing)],
                           capture_output=True, text=True)
        if p.returncode == 0:
            dev = p.stdout.strip()
            try:
                yield dev
            finally:
                subprocess.run(["losetup", "-d", dev], check=True)
            return
        why = f"losetup failed: {p.stderr.strip()}"
    if IN_CI:
        pytest.fail(f"no loop device ({why}) -- required when CI=true", pytrace=False)
    pytest.skip(f"no loop device ({why}; needs root)")


@pytest.fixture
def source(tmp_path):
    """A 16 MiB qcow2 image: data, a zero cluster, a partly written cluster
    and unallocated space (which must read as zeros wherever it lands)."""
    path = tmp_path / "source.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, str(DEV_SIZE))
    qemu_io(path, "write -P 0x11 0 1M", "write -z 1M 64k", "write -P 0x22 3M 3000",
            f"write -P 0x33 {DEV_SIZE - MiB} 1M")
    return path


def device_holds_qcow2(dev):
    info = qemu_img("info", "--output=json", dev).stdout_text
    return '"format": "qcow2"' in info


def test_qcow2_image_on_a_device(device):
    qemu_img("create", "-q", "-f", "qcow2", device, str(64 * MiB))
    qemu_io(device, "write -P 0x5a 0 128k")
    with qcow2fast.open(device, "r+") as img:
        assert img.file.size() == DEV_SIZE
        assert img.read(0, 128 << 10) == b"\x5a" * (128 << 10)
        assert img.read(1 * MiB, 4096) == bytes(4096)       # unallocated: zeros, not 0xee
        img.write(2 * MiB + 100, b"\x44" * 5000)             # a new cluster, partly written
        img.write_zeroes(0, 4096)
    qemu_img("check", device)
    qemu_io(device, "read -P 0 0 4096", "read -P 0x5a 4096 124k",
            f"read -P 0 {2 * MiB} 100", f"read -P 0x44 {2 * MiB + 100} 5000",
            f"read -P 0 {2 * MiB + 5100} {64 * 1024 - 5100}")


def test_writing_past_the_device_end_names_the_offset(device):
    qemu_img("create", "-q", "-f", "qcow2", device, str(64 * MiB))
    with qcow2fast.open(device, "r+") as img:
        with pytest.raises(OSError) as e:
            img.write(0, b"\x01" * (20 * MiB))
        assert e.value.errno == errno.ENOSPC
        assert "offset 0x" in str(e.value) and device in str(e.value)


def test_create_on_a_device(device, capsys):
    status, _, _ = run_cli(capsys, "create", "-q", "-f", "qcow2", device, "8M")
    assert status == 0
    qemu_img("check", device)
    assert '"virtual-size": 8388608' in qemu_img("info", "--output=json", device).stdout_text
    assert run_cli(capsys, "create", "-q", "-f", "raw", device, "16M")[0] == 0
    status, _, err = run_cli(capsys, "create", "-q", "-f", "raw", device, "17M")
    assert status == 1 and "cannot grow" in err


@pytest.mark.parametrize("extra", [[], ["-t", "none"], ["-n"], ["-S", "0"]],
                         ids=["default", "t-none", "n", "S0"])
def test_convert_to_a_raw_device(device, source, extra, capsys):
    status, _, err = run_cli(capsys, "convert", "-O", "raw", *extra, source, device)
    assert status == 0, err
    # Holes and zero clusters became zeros over the device's old 0xee.
    qemu_img("compare", "-f", "qcow2", "-F", "raw", source, device)


@pytest.mark.parametrize("extra", [[], ["-c"], ["-t", "none"], ["-o", "extended_l2=on"],
                                   ["-o", "cluster_size=4096,refcount_bits=1"]],
                         ids=["default", "c", "t-none", "extended-l2", "4k-rc1"])
def test_convert_to_a_qcow2_device(device, source, extra, capsys):
    status, _, err = run_cli(capsys, "convert", "-O", "qcow2", *extra, source, device)
    assert status == 0, err
    qemu_img("check", device)
    qemu_img("compare", source, device)


def test_convert_to_a_preallocated_qcow2_device(device, tmp_path, capsys):
    # Metadata preallocation maps every cluster to the device's old data
    # (as qemu's does); convert then writes zeros where the source has none.
    src = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, str(8 * MiB))
    qemu_io(src, "write -P 0x11 1M 1M", "write -P 0x22 5M 4000")
    status, _, err = run_cli(capsys, "convert", "-O", "qcow2", "-o", "preallocation=metadata",
                             src, device)
    assert status == 0, err
    qemu_img("check", device)
    qemu_img("compare", src, device)


def test_convert_from_a_device(device, tmp_path, capsys):
    with open(device, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\x77" * MiB)
        f.seek(9 * MiB)
        f.write(bytes(2 * MiB))
    out = tmp_path / "copy.qcow2"
    status, _, err = run_cli(capsys, "convert", "-f", "raw", "-O", "qcow2", device, out)
    assert status == 0, err
    qemu_img("compare", "-F", "raw", out, device)
    assert f"virtual size: 16 MiB ({DEV_SIZE} bytes)" in run_cli(capsys, "info", "-f", "raw",
                                                                  device)[1]


def test_raw_too_large_for_the_device(device, tmp_path, capsys):
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", big, str(32 * MiB))
    status, _, err = run_cli(capsys, "convert", "-O", "raw", big, device)
    assert status == 1
    assert "cannot grow" in err and str(33554432) in err and str(DEV_SIZE) in err


def test_failed_qcow2_on_a_device_does_not_look_like_an_image(device, source, tmp_path,
                                                               capsys):
    # The device first holds a valid image, then a conversion that cannot fit fails.
    assert run_cli(capsys, "convert", "-O", "qcow2", source, device)[0] == 0
    assert device_holds_qcow2(device)
    data = tmp_path / "random.raw"
    data.write_bytes(os.urandom(24 * MiB))
    status, _, err = run_cli(capsys, "convert", "-O", "qcow2", data, device)
    assert status == 1
    assert "No space left on device" in err and "offset 0x" in err and device in err
    assert not device_holds_qcow2(device)
    # Through the image layer (preallocation does not fit either): the same.
    assert run_cli(capsys, "convert", "-O", "qcow2", source, device)[0] == 0
    status, _, err = run_cli(capsys, "convert", "-O", "qcow2", "-o", "preallocation=metadata",
                             data, device)
    assert status == 1 and "cannot grow" in err
    assert not device_holds_qcow2(device)


def test_info_map_check_on_a_device_match_qemu(device, source, capsys):
    assert run_cli(capsys, "convert", "-O", "qcow2", source, device)[0] == 0
    for fmt in ("qcow2", "raw"):
        for cmd in (["info"], ["map"], ["check"]):
            if fmt == "raw" and cmd == ["check"]:
                continue            # qemu-img: raw "does not support checks"
            status, out, err = run_cli(capsys, *cmd, "-f", fmt, "--output=json", device)
            assert status == 0, err
            assert out == qemu_img(*cmd, "-f", fmt, "--output=json", device).stdout_text, \
                (fmt, cmd)
