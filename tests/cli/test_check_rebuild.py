"""check -r all's rebuild of the refcount structures leaves the very file
qemu-img check -r all leaves: the same messages and status, and byte for
byte the same image (new refcount blocks and table where qemu puts them,
a refcount block past the end of the file repaired by growing it, an
image without any refcount table rebuilt), as iotest 108 checks."""

import os
import shutil
import struct

import pytest

from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import header, patch, qemu_check, qemu_create, qemu_img, qemu_io, \
    qemu_raw

pytestmark = pytest.mark.qemu


def _zero_first_refcount(p):
    h = header(p)
    (rb,) = struct.unpack(">Q", open(p, "rb").read()[h["refcount_table_offset"]:][:8])
    patch(p, rb, ">H", 0)          # cluster 0 (the header) reads as free


def _no_reftable(p):
    patch(p, 0x30, ">Q", 0)
    patch(p, 0x38, ">I", 0)


def _refblock_past_eof(value, refcount_of_16=None):
    def damage(p):
        patch(p, header(p)["refcount_table_offset"] + 8, ">Q", value)
        if refcount_of_16 is not None:
            patch(p, 0x20020, ">H", refcount_of_16)
    return damage


WRITES = ("write -P 42 0 64k", "write -P 7 1M 100k")
# 512-byte clusters, freed clusters inside the file: the new table goes in a hole
HOLES = WRITES + ("discard 0 512", "discard 4k 1k", "discard 20k 2k")

DAMAGES = {
    "first_refcount_zero": (_zero_first_refcount, WRITES, {}),
    "no_refcount_table": (_no_reftable, WRITES, {}),
    "refblock_past_eof_clean": (_refblock_past_eof(0x100000, 1), WRITES, {}),
    "refblock_past_eof_unallocated": (_refblock_past_eof(0x100000), WRITES, {}),
    "refblock_offset_overflows": (_refblock_past_eof(0x7FFFFFFFFFFF0000), WRITES, {}),
    "holes_512": (_zero_first_refcount, HOLES, {"cluster_size": 512}),
}


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_rebuild_leaves_the_file_qemu_leaves(capsys, tmp_path, name):
    damage, writes, opts = DAMAGES[name]
    p = qemu_create(tmp_path / "t.qcow2", 64 << 20, **opts)
    qemu_io(p, *writes)
    data = qemu_raw(p)
    damage(p)
    q = str(tmp_path / "q.qcow2")
    shutil.copy(p, q)
    ref = qemu_img("check", "-r", "all", q, check=False)
    status, out, err = run_cli(capsys, "check", "-r", "all", p)
    assert (status, out, err) == (ref.returncode, ref.stdout_text, ref.stderr_text)
    assert os.path.getsize(p) == os.path.getsize(q)
    assert open(p, "rb").read() == open(q, "rb").read()
    qemu_check(p)
    assert qemu_raw(p) == data


def test_plain_check_of_an_image_without_refcount_table(capsys, tmp_path):
    """check without -r reports it (qemu opens it for a check), and every
    other command refuses it with qemu's words."""
    p = qemu_create(tmp_path / "t.qcow2", 1 << 20)
    _no_reftable(p)
    ref = qemu_img("check", p, check=False)
    assert run_cli(capsys, "check", p) == (ref.returncode, ref.stdout_text, ref.stderr_text)
    ref = qemu_img("info", p, check=False)
    status, _, err = run_cli(capsys, "info", p)
    assert status == ref.returncode == 1
    assert "Image does not contain a reference count table" in err
