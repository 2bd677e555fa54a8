"""qemu's null-co/null-aio protocol (host/null.py) by every name qemu takes
(``null-co://``, ``json:``, ``--image-opts driver=null-co``), compared with
qemu-img 7.2 (qemu-iotests 150, 153 and 155 use it); and raw sizes in whole
sectors, as qemu's block layer has them."""

import json

import pytest

import qcow2fast
from qcow2fast.errors import InvalidArgumentError, UnsupportedFeatureError
from qcow2fast.host.null import NullImage
from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import qemu_check, qemu_img

pytestmark = pytest.mark.qemu
MiB = 1 << 20
NULL_1M = "json:{'driver': 'null-co', 'size': 1048576, 'read-zeroes': true}"


def as_qemu(text):
    return text.replace("qcow2fast: ", "qemu-img: ")


def same_as_qemu(capsys, *argv):
    """Run both; the exit status, stdout and stderr are qemu-img's."""
    want = qemu_img(*argv, check=False)
    status, out, err = cli(capsys, *argv)
    assert (status, out, as_qemu(err)) == (want.returncode, want.stdout_text,
                                           want.stderr_text), argv
    return out


@pytest.mark.parametrize("argv", [
    ["info", "null-co://"],
    ["info", "--output=json", "null-co://"],
    ["info", "-f", "null-co", "null-co://"],
    ["info", "--output=json", "-f", "null-aio", "null-aio://"],
    ["info", "--output=json", 'json:{"driver": "null-co", "size": 1048576, "read-zeroes": true}'],
    ["info", 'json:{"driver": "null-aio", "latency-ns": 5}'],
    ["info", "--output=json", 'json:{"driver": "raw", "file": {"driver": "null-co", "size": 4096}}'],
    ["info", 'json:{"file": {"driver": "null-co"}}'],
    ["info", "--image-opts", "driver=null-co,size=4096"],
    ["info", "-U", "--image-opts", "driver=null-co,force-share=on"],
    # refusals: qemu's messages and statuses
    ["info", "-U", "--image-opts", "driver=null-co,force-share=off"],
    ["info", 'json:{"driver": "null-co", "bogus": 1}'],
    ["info", "-f", "raw", NULL_1M],
    ["info", "-f", "qcow2", 'json:{"file": {"driver": "null-co"}}'],
    ["info", "-f", "null-co", 'json:{"driver": "raw", "file": {"driver": "null-co"}}'],
    ["map", "null-co://"],
    ["map", "--output=json", "null-co://"],
    ["map", "--output=json", NULL_1M],
    ["measure", "-O", "qcow2", "null-co://"],
    ["check", "null-co://"],
    ["compare", NULL_1M, 'json:{"driver": "null-aio", "size": 1048576}'],
], ids=lambda a: " ".join(a))
def test_as_qemu_img(capsys, argv):
    same_as_qemu(capsys, *argv)


@pytest.mark.parametrize("sparse", ["512", "0"])
def test_convert_from_null(capsys, tmp_path, sparse):
    """qemu-iotests 150: zeros are skipped with -S 512 and all allocated with
    -S 0, as qemu-img's own conversion; the output reads as the device."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu_img("convert", "-O", "qcow2", "-S", sparse, NULL_1M, theirs)
    status, _, err = cli(capsys, "convert", "-O", "qcow2", "-S", sparse, NULL_1M, ours)
    assert status == 0, err
    qemu_check(ours)
    mapped = [line.split()[:2] for line in
              qemu_img("map", ours).stdout_text.splitlines()[1:]]
    assert mapped == [line.split()[:2] for line in
                      qemu_img("map", theirs).stdout_text.splitlines()[1:]]
    assert mapped == ([] if sparse == "512" else [["0", "0x100000"]])
    assert qemu_img("compare", "-F", "qcow2", NULL_1M, ours).returncode == 0


def test_convert_reads_an_open_device_and_leaves_it_open(tmp_path):
    dest = tmp_path / "out.raw"
    dev = NullImage(size=MiB, read_zeroes=True)
    qcow2fast.convert(dev, dest, format="raw")
    assert not dev.closed and dest.stat().st_size == MiB
    assert dest.read_bytes() == bytes(MiB)


def test_null_device_writes_go_nowhere():
    dev = NullImage(size=MiB, writable=True)
    assert dev.write(0, b"x" * 512) == 512
    assert dev.read(0, 512) == bytes(512)
    with pytest.raises(InvalidArgumentError, match="read-only"):
        NullImage().write(0, b"x")
    with pytest.raises(InvalidArgumentError, match="only allowed filename .* 'null-co://'"):
        NullImage.from_options({"driver": "null-co", "filename": "/etc/passwd"})
    with pytest.raises(InvalidArgumentError, match="'size' expects"):
        NullImage.from_options({"driver": "null-co", "size": -1})


def test_null_backing_file(capsys, tmp_path):
    """qemu-iotests 155: ``create -b null-co:// -F raw`` writes what qemu-img
    writes (the size from -o or the device's 1 GiB); qcow2fast then refuses
    to read through such a chain, saying why."""
    for size in ("1440K", None):
        ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
        argv = ["create", "-q", "-f", "qcow2", "-b", "null-co://", "-F", "raw"]
        tail = [size] if size else []
        qemu_img(*argv, theirs, *tail)
        status, _, err = cli(capsys, *argv, ours, *tail)
        assert status == 0, err
        assert ours.read_bytes() == theirs.read_bytes()
        ours.unlink()
        theirs.unlink()
    qemu_img("create", "-q", "-f", "qcow2", "-b", "null-co://", "-F", "raw", theirs)
    with pytest.raises(UnsupportedFeatureError, match="null protocol is not supported"):
        qcow2fast.open(theirs)


@pytest.mark.parametrize("size", [1000, 512, 513, 4095])
def test_raw_sizes_are_whole_sectors(capsys, tmp_path, size):
    """qemu's block layer sizes a raw file in whole 512-byte sectors (the
    tail reads as zeros): info, map and a convert of it say so."""
    raw = tmp_path / "odd.raw"
    raw.write_bytes(b"\xab" * size)
    whole = -(-size // 512) * 512
    info = json.loads(same_as_qemu(capsys, "info", "--output=json", raw))
    assert info["virtual-size"] == whole
    extents = json.loads(same_as_qemu(capsys, "map", "--output=json", raw))
    assert extents[-1]["start"] + extents[-1]["length"] == whole
    out = tmp_path / "out.raw"
    assert cli(capsys, "convert", "-O", "raw", raw, out)[0] == 0
    assert out.read_bytes() == raw.read_bytes() + bytes(whole - size)
