"""Inputs the fuzzer found (tests/hardening/fuzzer.py, scripts/fuzz.py),
rebuilt from qemu-made images: each is refused with a clear error."""

import os
import struct
import sys

import pytest

import qcow2fast
from qcow2fast.fsck.check import check_image
from tests.hardening.fuzz_structures import EXT_BITMAPS, _extensions
from tests.helpers.qemu_util import run

pytestmark = pytest.mark.qemu


def _bitmap_image(tmp_path):
    p = str(tmp_path / "b.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p, "1M"])
    run(["qemu-img", "bitmap", "--add", p, "b0"])
    return p


def test_bitmap_directory_offset_past_2_63(tmp_path):
    """scripts/fuzz.py --target read --seed 102 (and check 103, convert 105):
    a bitmap directory offset 0xffff000000011000 (cluster aligned) overflowed
    the file read; now qemu's "invalid bitmap directory offset"."""
    p = _bitmap_image(tmp_path)
    with open(p, "r+b") as f:
        data = f.read()
        (off,) = [o for m, o, _ in _extensions(data) if m == EXT_BITMAPS]
        f.seek(off + 16)
        f.write(struct.pack(">Q", 0xffff000000011000))
    # (an open that leaves the bitmaps unloaded goes through: no OverflowError)
    try:
        with qcow2fast.open(p, "r", untrusted=True):
            pass
    except qcow2fast.Qcow2Error as e:
        assert "invalid bitmap directory offset" in str(e)
    with pytest.raises(qcow2fast.Qcow2Error, match="invalid bitmap directory offset"):
        check_image(p)
    # (convert copies without the bitmaps unless asked: it may go through)
    try:
        qcow2fast.convert(p, str(tmp_path / "out.qcow2"), format="qcow2")
    except qcow2fast.Qcow2Error as e:
        assert "invalid bitmap directory offset" in str(e)


def test_backing_name_with_an_unknown_protocol(tmp_path):
    """scripts/fuzz.py --target convert --seed 105: a backing file name
    "nbd://localhost/x" reached fsspec's ValueError ("Protocol not known");
    now an UnsupportedFeatureError naming the URL (untrusted: refused before).
    NBD names are read by qcow2fast's own client since: one without a server
    is an OSError naming the layer."""
    p = str(tmp_path / "top.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "gopher://localhost/x", "-F",
         "raw", p, "1M"])
    with pytest.raises(qcow2fast.UnsupportedFeatureError, match="gopher://localhost/x.*gopher"):
        qcow2fast.convert(p, str(tmp_path / "out.qcow2"), format="qcow2")
    nbd = str(tmp_path / "nbd.qcow2")
    sock = tmp_path / "nobody.sock"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", f"nbd+unix://?socket={sock}",
         "-F", "raw", nbd, "1M"])
    with pytest.raises(OSError, match=f"layer 1 .*Failed to connect to '{sock}'"):
        qcow2fast.convert(nbd, str(tmp_path / "out.qcow2"), format="qcow2")
    with pytest.raises(qcow2fast.Qcow2Error):
        with qcow2fast.open(p, "r", untrusted=True):
            pass
    assert not os.path.exists(tmp_path / "out.qcow2")


def test_refcount_block_offset_that_wraps_past_2_64(tmp_path):
    """The fuzzer's lifecycle target: a refcount table entry of
    0xfffffffffffff000 passed the end-of-file check (offset + cluster size
    wrapped to 0) and opening for writing ran out of memory marking it as
    metadata.  It is refused, naming the field, in bounded memory."""
    from qcow2fast._ext.kernels import table_first_past
    from tests.helpers.qemu_util import header, patch, qemu_create, run_python
    import numpy as np
    assert table_first_past(np.array([0x2000, 0xfffffffffffff000], dtype=np.uint64),
                            (1 << 64) - 1, 4096, 1 << 20) == 1
    path = qemu_create(tmp_path / "wrap.qcow2", 1 << 20, cluster_size=4096)
    patch(path, header(path)["refcount_table_offset"] + 8 * 15, ">Q", 0xfffffffffffff000)
    p = run_python(f"import qcow2fast\nqcow2fast.open({str(path)!r}, 'r+')", check=False,
                   mem_limit=1 << 30)
    assert p.returncode == 1
    assert "CorruptImageError" in p.stderr_text and "0xfffffffffffff000 lies past the end" in \
        p.stderr_text, p.stderr_text[-2000:]


def test_bitmap_table_offset_past_2_63(tmp_path):
    """scripts/fuzz.py --target repair --seed 24: a bitmap table offset of
    0x8000000000000000 (cluster aligned) overflowed the table read in
    check's loadability test; now the table is not read and the check
    reports the reference past the end of the file, as qemu's does."""
    p = _bitmap_image(tmp_path)
    with open(p, "r+b") as f:
        data = f.read()
        (off,) = [o for m, o, _ in _extensions(data) if m == EXT_BITMAPS]
        (directory,) = struct.unpack_from(">Q", data, off + 16)
        f.seek(directory)
        f.write(struct.pack(">Q", 1 << 63))
    res = check_image(p, "all")
    assert res.corruptions >= 1
    assert any("offset 0x8000000000000000" in m for m in res.messages), res.messages


@pytest.mark.parametrize("bits", [64, 8])
def test_refcount_block_for_clusters_past_the_end(tmp_path, bits):
    """scripts/fuzz.py --target lifecycle --seed 11: a refcount table entry
    at index 4555 (a block for host clusters from 0x8e58 << 32, far past the
    0.6 MB file) made amend -o refcount_bits allocate every refcount up to
    it (1.1 GiB): a MemoryError under 1 GiB of address space.  It is
    refused, naming the entry, before anything is written."""
    from tests.helpers.qemu_util import file_state, header, patch, qemu_create, run_python
    path = qemu_create(tmp_path / "far.qcow2", 4 << 20)
    h = header(path)
    first_block = struct.unpack(">Q", open(path, "rb").read()[h["refcount_table_offset"]:][:8])[0]
    patch(path, h["refcount_table_offset"] + 8 * 4555, ">Q", first_block)
    before = file_state(path)
    p = run_python("from qcow2fast.ops.amend import amend\n"
                   f"amend({str(path)!r}, {{'refcount_bits': {bits}}})", check=False,
                   mem_limit=1 << 30)
    assert p.returncode == 1
    assert "CorruptImageError" in p.stderr_text and "refcount table entry 4555" in \
        p.stderr_text, p.stderr_text[-2000:]
    assert file_state(path) == before


def test_dirty_image_whose_snapshot_table_repair_reopens_it(tmp_path):
    """scripts/fuzz.py --target repair --seed 23: a dirty image (lazy
    refcounts, not closed) whose snapshot entry claims 256 KiB of extra data
    in a 40 KiB file.  check -r all rewrites the mended snapshot table
    through an Image opened for the repair, and that open, seeing the dirty
    bit, started check -r all again: a RecursionError.  The repair's own
    open no longer repairs; the command ends with one clear line."""
    from tests.helpers.qemu_util import header, patch, qemu_create, qemu_img, qemu_io
    path = qemu_create(tmp_path / "dirty.qcow2", 1 << 20, cluster_size=4096,
                       refcount_bits=64)
    qemu_io(path, "write -P 1 0 4k")
    qemu_img("snapshot", "-c", "s", path)
    h = header(path)
    patch(path, h["snapshots_offset"] + 36, ">I", 0x40018)    # extra_data_size
    patch(path, 72, ">Q", h["incompatible_features"] | 1)      # dirty
    p = run([sys.executable, "-m", "qcow2fast", "check", "-r", "all", str(path)],
            check=False, timeout=120)
    assert "RecursionError" not in p.stderr_text and "Traceback" not in p.stderr_text, \
        p.stderr_text[-3000:]
    lines = p.stderr_text.splitlines()
    assert "Discarding too much extra metadata in snapshot table entry 0 (262168 > 1024)" \
        in lines
    # (qemu-img check -r all fails on it too: "Check failed: Input/output error")
    assert p.returncode == 1 and "would drop below zero" in lines[-1], p.stderr_text


@pytest.mark.parametrize("key,value", [
    ("cache-clean-interval", v) for v in ("4k", "0.5", "", "on", "-1", "4294967296", "0x10", "010")
] + [("l2-cache-size", v) for v in ("x", "0.5", "1.5k", "0x10000", "64k")])
def test_cache_option_values_as_qemu(capsys, tmp_path, key, value):
    """Fuzzing names (seed 31): cache-clean-interval=4k in --image-opts or
    json: was a ValueError traceback; now qemu's number and size syntax
    and words."""
    from tests.helpers.cli_util import run_cli
    from tests.helpers.qemu_util import qemu_img
    img = str(tmp_path / "a.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    opts = f"driver=qcow2,file.filename={img},{key}={value}"
    want = qemu_img("info", "--image-opts", opts, check=False)
    status, out, err = run_cli(capsys, "info", "--image-opts", opts)
    assert (status, err.replace("qcow2fast: ", "qemu-img: ")) == (want.returncode,
                                                                 want.stderr_text)


@pytest.mark.parametrize("errno_value", [None, {}, [1], float("inf")])
def test_blkdebug_rule_values_that_are_not_numbers(tmp_path, errno_value):
    """Fuzzing names (seed 31): a rule's number given as null or an object
    was a TypeError; it is a clear error naming the parameter."""
    from qcow2fast.errors import InvalidArgumentError
    from qcow2fast.host import blkdebug
    with pytest.raises(InvalidArgumentError, match="Parameter 'errno' expects a number"):
        blkdebug.Rule(blkdebug.INJECT, {"event": "none", "errno": errno_value})
