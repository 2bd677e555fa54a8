"""The backing format, as qemu-iotests 114 drives it: an image whose header
names its backing format twice (qemu reads the extensions in order: the
last wins), and convert -B without a backing format (refused, as qemu-img
7.2 does)."""

import struct

import pytest

import qcow2fast
from qcow2fast.errors import CorruptImageError
from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import (EXT_BACKING_FORMAT, EXT_END, EXT_FEATURE_TABLE,
                                     H_BACKING_FILE_OFFSET, MiB, header, patch, patch_bytes,
                                     qemu_check, qemu_create, qemu_img, qemu_info,
                                     read_extensions)

pytestmark = pytest.mark.qemu


def _add_extension(path, kind, data):
    """Append an extension to the header area, the backing name moved after it."""
    h = header(path)
    with open(path, "rb") as f:
        f.seek(h["backing_file_offset"])
        name = f.read(h["backing_file_size"])
    exts, start = read_extensions(path)
    area = b"".join(struct.pack(">II", t, len(d)) + d + bytes(-len(d) % 8)
                    for t, d in exts + [(kind, data)]) + struct.pack(">II", EXT_END, 0)
    patch_bytes(path, start, area + name)
    if name:
        patch(path, H_BACKING_FILE_OFFSET, ">Q", start + len(area))


@pytest.fixture
def twice(tmp_path):
    base = qemu_create(tmp_path / "base.qcow2", MiB)
    top = qemu_create(tmp_path / "top.qcow2", MiB, backing="base.qcow2")
    _add_extension(top, EXT_BACKING_FORMAT, b"foo")
    return base, top


def test_the_last_backing_format_wins_as_in_qemu(capsys, twice):
    _, top = twice
    status, out, err = cli(capsys, "info", str(top))
    assert (status, out, err) == (0, qemu_img("info", top).stdout_text, "")
    assert "backing file format: foo" in out


def test_rebase_rewrites_one_backing_format(capsys, twice):
    base, top = twice
    assert cli(capsys, "rebase", "-u", "-b", str(base), "-F", "qcow2", str(top))[0] == 0
    assert [t for t, _ in read_extensions(top)[0]].count(EXT_BACKING_FORMAT) == 1
    assert qemu_info(top)["backing-filename-format"] == "qcow2"
    qemu_check(top)


def test_any_other_extension_twice_is_refused(tmp_path):
    top = qemu_create(tmp_path / "t.qcow2", MiB, backing=None)
    _add_extension(top, EXT_FEATURE_TABLE, bytes(48))
    with pytest.raises(CorruptImageError, match="appears twice"):
        qcow2fast.open(str(top))


@pytest.mark.parametrize("opts", [["-B", "{src}"], ["-o", "backing_file={src}"],
                                  ["-B", "{src}", "-F", "raw"]])
def test_convert_backing_needs_its_format_as_qemu(capsys, tmp_path, opts):
    src = tmp_path / "s.raw"
    src.write_bytes(bytes(MiB))
    ours, theirs = tmp_path / "o.qcow2", tmp_path / "q.qcow2"
    args = [a.format(src=src) for a in opts]
    status, out, err = cli(capsys, "convert", "-O", "qcow2", *args, str(src), str(ours))
    q = qemu_img("convert", "-O", "qcow2", *args, src, theirs, check=False)
    assert (status, out, err.replace("qcow2fast: ", "qemu-img: ")) == \
        (q.returncode, q.stdout_text, q.stderr_text)
    assert ours.exists() == theirs.exists()
