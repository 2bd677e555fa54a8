"""convert --salvage against qemu-img 7.2: a source sector that cannot be
read (here: a compressed cluster whose data no longer inflates) is written
as zeros with qemu's warning for it (in disk order), the rest copied; -q
keeps the warnings quiet; -C refuses it; without --salvage it fails."""

import pytest

import qcow2fast
from qcow2fast.errors import ConvertError
from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import (MiB, compressed_descriptor, header, l2_entry_offset,
                                     patch_bytes, qemu_create, qemu_img, qemu_io, qemu_raw,
                                     read_at)

pytestmark = pytest.mark.qemu

BROKEN = (3 << 16, 9 << 16)         # guest offsets of the clusters made unreadable


@pytest.fixture
def damaged(tmp_path):
    plain = qemu_create(tmp_path / "plain.qcow2", 2 * MiB)
    qemu_io(plain, "write -P 0x33 0 2M")
    path = tmp_path / "damaged.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", plain, path)
    cb = header(path)["cluster_bits"]
    for guest in BROKEN:
        (entry,) = read_at(path, l2_entry_offset(path, guest), ">Q")
        patch_bytes(path, compressed_descriptor(entry, cb)[0], b"\xff" * 64)
    return path


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("quiet", [False, True])
def test_salvage_as_qemu(damaged, tmp_path, capsys, out_fmt, quiet):
    ours, theirs = tmp_path / f"ours.{out_fmt}", tmp_path / f"qemu.{out_fmt}"
    q = ["-q"] if quiet else []
    want = qemu_img("convert", *q, "--salvage", "-O", out_fmt, damaged, theirs)
    status, out, err = cli(capsys, "convert", *q, "--salvage", "-O", out_fmt, damaged, ours)
    assert (status, out) == (want.returncode, want.stdout_text) == (0, "")
    # (the same lines; qemu's order depends on how its 8 coroutines interleave)
    assert sorted(err.replace("qcow2fast:", "qemu-img:").splitlines()) == \
        sorted(want.stderr_text.splitlines())
    assert err.count("warning: error while reading offset") == (0 if quiet else 2 * 128)
    data = qemu_raw(ours, fmt=out_fmt)
    assert data == qemu_raw(theirs, fmt=out_fmt)
    for guest in BROKEN:
        assert data[guest:guest + (64 << 10)] == bytes(64 << 10)
    assert data.count(b"\x33") == 2 * MiB - len(BROKEN) * (64 << 10)


def test_salvage_in_the_library_and_refusals(damaged, tmp_path, capsys):
    seen = []
    qcow2fast.convert(damaged, tmp_path / "lib.raw", format="raw", salvage=True,
                      warn=seen.append)
    assert seen == [f"error while reading offset {g + k}: Input/output error"
                    for g in BROKEN for k in range(0, 64 << 10, 512)]
    with pytest.raises(ConvertError):
        qcow2fast.convert(damaged, tmp_path / "no.raw", format="raw")
    args = ["-C", "--salvage", "-O", "raw", str(damaged), str(tmp_path / "c.raw")]
    want = qemu_img("convert", *args, check=False)
    status, _, err = cli(capsys, "convert", *args)
    assert status == want.returncode == 1
    assert err.split(": ", 1)[1] == want.stderr_text.split(": ", 1)[1]
