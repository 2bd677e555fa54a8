"""Malformed images: a clear Qcow2Error, never a crash, hang or huge allocation.

Each malformed file is made by patching bytes of a qemu-made image at the
offsets of docs/interop/qcow2.txt.  The attempt (open, then read everything)
runs in a child Python with a 1 GiB address-space limit and a timeout, so a
hang or an unbounded allocation fails the test instead of the machine.  The
error must be the expected subclass, its message must name the field or
offset, and a read-only attempt must leave the file untouched.
"""

import json
import os
import re
import shutil
import struct
import zlib

import pytest

import qcow2fast
from qcow2fast.errors import (CorruptImageError, ImageClosedError, Qcow2Error,
                              ReadOnlyImageError, UnsupportedFeatureError)
from tests.helpers.qemu_util import (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, H_BACKING_FILE_OFFSET,
                                     H_CLUSTER_BITS, H_COMPRESSION_TYPE, H_CRYPT_METHOD,
                                     H_HEADER_LENGTH, H_INCOMPATIBLE, H_L1_SIZE, H_L1_TABLE_OFFSET,
                                     H_MAGIC, H_NB_SNAPSHOTS, H_REFCOUNT_ORDER,
                                     H_REFCOUNT_TABLE_CLUSTERS, H_REFCOUNT_TABLE_OFFSET, H_SIZE,
                                     H_VERSION, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT,
                                     L2E_OFFSET_MASK, MiB, QCOW_OFLAG_COPIED, compressed_descriptor,
                                     file_state, header, is_marked_corrupt, l1_entry_offset,
                                     l2_entry_offset, make_compressed_entry, patch, patch_bytes,
                                     qemu_create, qemu_img, qemu_io, qemu_raw, read_at,
                                     read_extensions, run_python, write_extensions)

pytestmark = pytest.mark.qemu

MEM_LIMIT = 1 << 30
CHILD = r"""
import json, sys, traceback
import qcow2fast
path, mode, action, kw = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
res = {"stage": "open"}
try:
    img = qcow2fast.open(path, mode, **kw)
    res["stage"] = action
    try:
        if action == "read":
            size = img.size
            pos = 0
            while pos < size:
                n = min(1 << 20, size - pos)
                img.read(pos, n)
                pos += n
            img.block_status()
        elif action == "write":
            img.write(0, b"\x5a" * 4096)
            img.flush()
        res["stage"] = "done"
    finally:
        img.close()
except BaseException as e:
    res.update(exc=type(e).__name__, mro=[c.__name__ for c in type(e).__mro__],
               msg=str(e), tb=traceback.format_exc())
print("RESULT " + json.dumps(res))
"""


def attempt(path, mode="r", action="read", **kw):
    """Open (+read or write) in a bounded child; return its result dict."""
    code = ("import sys\nsys.argv = ['x'] + " + repr([str(path), mode, action, json.dumps(kw)])
            + "\n" + CHILD)
    try:
        p = run_python(code, timeout=60, check=False, mem_limit=MEM_LIMIT)
    except Exception as e:           # subprocess.TimeoutExpired
        raise AssertionError(f"opening {path} hung (no answer within 60 s): {e}")
    lines = [l for l in p.stdout_text.splitlines() if l.startswith("RESULT ")]
    assert lines, (f"child crashed (exit {p.returncode}) on {path}:\n"
                   f"{p.stdout_text[-3000:]}\n{p.stderr_text[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def expect_error(path, exc, names, *, stage=("open",), mode="r", action="read", **kw):
    """The attempt fails with ``exc`` (a class or tuple) whose message names the field."""
    before = file_state(path) if mode == "r" else None
    res = attempt(path, mode, action, **kw)
    assert "exc" in res, f"{os.path.basename(str(path))}: no error raised (got to {res['stage']})"
    classes = exc if isinstance(exc, tuple) else (exc,)
    assert "Qcow2Error" in res["mro"] or any(c.__name__ in res["mro"] for c in classes
                                             if issubclass(c, OSError)), (
        f"expected a Qcow2Error, got {res['exc']}: {res['msg']}\n{res['tb']}")
    assert any(c.__name__ in res["mro"] for c in classes), (
        f"expected {[c.__name__ for c in classes]}, got {res['exc']}: {res['msg']}\n{res['tb']}")
    assert res["stage"] in stage, (
        f"error raised at {res['stage']}, expected at {stage}: {res['msg']}")
    msg = res["msg"].lower()
    assert any(n.lower() in msg for n in names), (
        f"message does not name any of {names}: {res['msg']!r}")
    if before is not None:
        assert file_state(path) == before, "a read-only open modified the file"
    return res


# ------------------------------------------------------------------ base images
CS = 65536


@pytest.fixture
def base(tmp_path):
    """A qemu-made v3 image: data clusters, one compressed cluster at 4*CS."""
    path = qemu_create(tmp_path / "base.qcow2", 4 * MiB, cluster_size=CS)
    qemu_io(path, f"write -q -P 0x11 0 {3 * CS}", f"write -q -c -P 0x22 {4 * CS} {CS}",
            f"write -q -P 0x33 {2 * MiB} {CS}")
    return path


def copy(base, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copyfile(base, dst)
    return dst


def test_base_image_is_fine(base):
    res = attempt(base)
    assert res.get("stage") == "done" and "exc" not in res, res
    with qcow2fast.open(base) as img:
        assert img.read(0, img.size) == qemu_raw(base)


# ------------------------------------------------------------------ header fields
HEADER_CASES = [
    # name, offset, fmt, value, expected error(s), words the message must contain
    ("bad_magic", H_MAGIC, ">4s", b"QFI\xfa", CorruptImageError, ["magic"]),
    ("zero_magic", H_MAGIC, ">4s", b"\0\0\0\0", CorruptImageError, ["magic"]),
    ("version_4", H_VERSION, ">I", 4, UnsupportedFeatureError, ["version"]),
    ("version_1", H_VERSION, ">I", 1, (UnsupportedFeatureError, CorruptImageError),
     ["version"]),
    ("version_huge", H_VERSION, ">I", 0xFFFFFFFF, (UnsupportedFeatureError, CorruptImageError),
     ["version"]),
    ("cluster_bits_8", H_CLUSTER_BITS, ">I", 8, CorruptImageError, ["cluster_bits", "cluster"]),
    ("cluster_bits_0", H_CLUSTER_BITS, ">I", 0, CorruptImageError, ["cluster_bits", "cluster"]),
    ("cluster_bits_22", H_CLUSTER_BITS, ">I", 22, (CorruptImageError, UnsupportedFeatureError),
     ["cluster_bits", "cluster"]),
    ("cluster_bits_63", H_CLUSTER_BITS, ">I", 63, (CorruptImageError, UnsupportedFeatureError),
     ["cluster_bits", "cluster"]),
    ("cluster_bits_max", H_CLUSTER_BITS, ">I", 0xFFFFFFFF,
     (CorruptImageError, UnsupportedFeatureError), ["cluster_bits", "cluster"]),
    ("l1_unaligned", H_L1_TABLE_OFFSET, ">Q", "L1+8", CorruptImageError, ["l1_table_offset", "l1"]),
    ("l1_unaligned_512", H_L1_TABLE_OFFSET, ">Q", "L1+512", CorruptImageError,
     ["l1_table_offset", "l1"]),
    ("l1_past_eof", H_L1_TABLE_OFFSET, ">Q", 1 << 30, CorruptImageError, ["l1_table_offset", "l1"]),
    ("l1_huge_offset", H_L1_TABLE_OFFSET, ">Q", 0xFFFFFFFFFFFF0000, CorruptImageError,
     ["l1_table_offset", "l1"]),
    ("l1_at_zero", H_L1_TABLE_OFFSET, ">Q", 0, CorruptImageError, ["l1_table_offset", "l1"]),
    ("l1_size_max", H_L1_SIZE, ">I", 0xFFFFFFFF, CorruptImageError, ["l1_size", "l1"]),
    ("l1_size_32MiB_past_eof", H_L1_SIZE, ">I", 4 * 1024 * 1024, CorruptImageError,
     ["l1_size", "l1"]),
    ("l1_size_0", H_L1_SIZE, ">I", 0, CorruptImageError, ["l1_size", "l1"]),
    ("size_huge", H_SIZE, ">Q", 1 << 62, CorruptImageError, ["l1_size", "l1", "size"]),
    ("reftable_unaligned", H_REFCOUNT_TABLE_OFFSET, ">Q", "RT+8", CorruptImageError,
     ["refcount_table_offset", "refcount"]),
    ("reftable_past_eof", H_REFCOUNT_TABLE_OFFSET, ">Q", 1 << 30, CorruptImageError,
     ["refcount_table_offset", "refcount"]),
    ("reftable_at_zero", H_REFCOUNT_TABLE_OFFSET, ">Q", 0, CorruptImageError,
     ["refcount_table_offset", "refcount"]),
    ("reftable_clusters_max", H_REFCOUNT_TABLE_CLUSTERS, ">I", 0xFFFFFFFF, CorruptImageError,
     ["refcount_table_clusters", "refcount"]),
    ("reftable_clusters_1M", H_REFCOUNT_TABLE_CLUSTERS, ">I", 1 << 20, CorruptImageError,
     ["refcount_table_clusters", "refcount"]),
    ("reftable_clusters_0", H_REFCOUNT_TABLE_CLUSTERS, ">I", 0, CorruptImageError,
     ["refcount_table_clusters", "refcount"]),
    ("refcount_order_7", H_REFCOUNT_ORDER, ">I", 7, (CorruptImageError, UnsupportedFeatureError),
     ["refcount_order", "refcount"]),
    ("header_length_small", H_HEADER_LENGTH, ">I", 96, CorruptImageError, ["header_length",
                                                                          "header length"]),
    ("header_length_odd", H_HEADER_LENGTH, ">I", 109, CorruptImageError, ["header_length",
                                                                         "header length"]),
    ("header_length_huge", H_HEADER_LENGTH, ">I", 0xFFFFFFF8, CorruptImageError,
     ["header_length", "header length"]),
    ("snapshots_past_eof", H_NB_SNAPSHOTS, ">IQ", (1000, 1 << 30), CorruptImageError,
     ["snapshot"]),
    ("snapshots_huge_count", H_NB_SNAPSHOTS, ">IQ", (0xFFFFFFFF, 0x50000), CorruptImageError,
     ["snapshot"]),
    ("compression_bit_zlib", H_INCOMPATIBLE, ">Q", INCOMPAT_COMPRESSION, CorruptImageError,
     ["compression"]),
]


@pytest.mark.parametrize("case", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_bad_header_field(base, tmp_path, case):
    name, off, fmt, value, exc, names = case
    path = copy(base, tmp_path, f"{name}.qcow2")
    h = header(path)
    if value == "L1+8":
        value = h["l1_table_offset"] + 8
    elif value == "L1+512":
        value = h["l1_table_offset"] + 512
    elif value == "RT+8":
        value = h["refcount_table_offset"] + 8
    values = value if isinstance(value, tuple) else (value,)
    patch(path, off, fmt, *values)
    expect_error(path, exc, names)
    if name.startswith("reftable"):
        expect_error(path, exc, names, mode="r+", action="write")


def test_unknown_compression_type(base, tmp_path):
    path = copy(base, tmp_path, "ctype.qcow2")
    patch(path, H_INCOMPATIBLE, ">Q", INCOMPAT_COMPRESSION)
    patch(path, H_COMPRESSION_TYPE, ">B", 7)
    expect_error(path, (UnsupportedFeatureError, CorruptImageError), ["compression"])


def test_zstd_type_without_bit(tmp_path):
    path = qemu_create(tmp_path / "z.qcow2", MiB, compression_type="zstd")
    h = header(path)
    patch(path, H_INCOMPATIBLE, ">Q", h["incompatible_features"] & ~INCOMPAT_COMPRESSION)
    expect_error(path, CorruptImageError, ["compression"])


def test_header_extension_runs_past_cluster(base, tmp_path):
    path = copy(base, tmp_path, "ext.qcow2")
    h = header(path)
    # Replace the first extension's length with something absurd.
    patch(path, h["header_length"] + 4, ">I", 0x7FFFFFF0)
    expect_error(path, CorruptImageError, ["extension"])


@pytest.mark.parametrize("length", [0, 4, 50, 71, 100])
def test_truncated_file(base, tmp_path, length):
    path = str(tmp_path / f"trunc{length}.qcow2")
    with open(base, "rb") as f:
        data = f.read(length)
    with open(path, "wb") as f:
        f.write(data)
    expect_error(path, CorruptImageError, ["magic", "header", "small", "short", "empty",
                                           "truncated", "size"])


def test_truncated_after_header(base, tmp_path):
    """The header is intact but the file ends in the middle of cluster 0."""
    path = copy(base, tmp_path, "cut.qcow2")
    os.truncate(path, 4096)
    expect_error(path, CorruptImageError, ["l1", "refcount", "eof", "end of the file", "past"])


def test_not_a_qcow2_file(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(os.urandom(1 << 20))
    expect_error(str(path), CorruptImageError, ["magic"])


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(OSError):
        qcow2fast.open(str(tmp_path / "does-not-exist.qcow2"))
    with pytest.raises(OSError):
        qcow2fast.open(str(tmp_path))


# ------------------------------------------------------------------ backing names
def test_backing_file_name_too_long(base, tmp_path):
    path = copy(base, tmp_path, "longname.qcow2")
    name = b"b" * 1500
    patch_bytes(path, 8192, name)
    patch(path, H_BACKING_FILE_OFFSET, ">QI", 8192, len(name))
    expect_error(path, (CorruptImageError, UnsupportedFeatureError),
                 ["backing_file_size", "backing file", "1023", "too long"])


def test_backing_file_name_past_first_cluster(base, tmp_path):
    path = copy(base, tmp_path, "namepast.qcow2")
    patch(path, H_BACKING_FILE_OFFSET, ">QI", CS - 10, 100)
    expect_error(path, CorruptImageError, ["backing_file", "backing file"])


def test_backing_loop_two_images(tmp_path):
    a = qemu_create(tmp_path / "a.qcow2", MiB)
    b = qemu_create(tmp_path / "b.qcow2", MiB, backing="a.qcow2")  # noqa
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    for p in (a, b):
        expect_error(p, Qcow2Error, ["loop", "cycle", "circular", "recurs", "itself",
                                     "chain"], stage=("open", "read"))
        res = attempt(p, backing=False)
        assert "exc" not in res, res


def test_backing_loop_self(tmp_path):
    a = qemu_create(tmp_path / "self.qcow2", MiB)
    qemu_img("rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", a)
    expect_error(a, Qcow2Error, ["loop", "cycle", "circular", "recurs", "itself", "chain"],
                 stage=("open", "read"))


def test_backing_loop_three_images_via_header_edit(tmp_path):
    """c -> b -> a -> c, the last link written by patching a's header."""
    a = qemu_create(tmp_path / "a.qcow2", MiB)
    qemu_create(tmp_path / "b.qcow2", MiB, backing="a.qcow2")
    c = qemu_create(tmp_path / "c.qcow2", MiB, backing="b.qcow2")
    exts, _ = read_extensions(a)
    write_extensions(a, [(EXT_BACKING_FORMAT, b"qcow2")] + exts)
    name = b"c.qcow2"
    patch_bytes(a, 4096, name)
    patch(a, H_BACKING_FILE_OFFSET, ">QI", 4096, len(name))
    expect_error(c, Qcow2Error, ["loop", "cycle", "circular", "recurs", "itself", "chain"],
                 stage=("open", "read"))


def test_missing_backing_file(tmp_path):
    a = qemu_create(tmp_path / "base.qcow2", MiB)
    top = qemu_create(tmp_path / "top.qcow2", MiB, backing="base.qcow2")
    os.unlink(a)
    with pytest.raises((OSError, Qcow2Error)) as ei:
        qcow2fast.open(top)
    assert "base.qcow2" in str(ei.value)
    with qcow2fast.open(top, backing=False) as img:
        assert img.read(0, 4096) == bytes(4096)


# ------------------------------------------------------------------ features
def add_feature_name(path, kind, bit, name):
    exts, _ = read_extensions(path)
    out = []
    for t, data in exts:
        if t == EXT_FEATURE_TABLE:
            data = data + struct.pack(">BB46s", kind, bit, name.encode())
        out.append((t, data))
    write_extensions(path, out)


def test_unknown_incompatible_bit_named(base, tmp_path):
    path = copy(base, tmp_path, "feat.qcow2")
    add_feature_name(path, 0, 5, "frobnicated clusters")
    patch(path, H_INCOMPATIBLE, ">Q", 1 << 5)
    expect_error(path, UnsupportedFeatureError, ["frobnicated clusters"])
    # qemu agrees that the image cannot be opened.
    assert qemu_img("info", path, check=False).returncode != 0


def test_unknown_incompatible_bit_unnamed(base, tmp_path):
    path = copy(base, tmp_path, "feat2.qcow2")
    patch(path, H_INCOMPATIBLE, ">Q", 1 << 40)
    res = expect_error(path, UnsupportedFeatureError, ["40"])
    assert re.search(r"\b40\b", res["msg"]), res["msg"]


def test_unknown_compatible_and_autoclear_bits_are_fine(base, tmp_path):
    path = copy(base, tmp_path, "compat.qcow2")
    patch(path, 80, ">QQ", 1 << 7, 0)
    res = attempt(path)
    assert "exc" not in res, res


def test_external_data_file(tmp_path):
    path = qemu_create(tmp_path / "d.qcow2", MiB, data_file=str(tmp_path / "d.raw"))
    expect_error(path, UnsupportedFeatureError, ["data file", "data_file"])


def test_luks_encryption(tmp_path):
    path = str(tmp_path / "luks.qcow2")
    # qemu's PBKDF benchmark fails now and then in VMs ("Unable to get
    # accurate CPU usage"): retry a few times.
    for _ in range(10):
        p = qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456",
                     "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                     path, "1M", check=False)
        if p.returncode == 0:
            break
    else:
        raise AssertionError(f"qemu-img could not create a LUKS image: {p.stderr_text}")
    assert header(path)["crypt_method"] == 2
    expect_error(path, UnsupportedFeatureError, ["encrypt", "luks"])


def test_aes_encryption(base, tmp_path):
    path = copy(base, tmp_path, "aes.qcow2")
    patch(path, H_CRYPT_METHOD, ">I", 1)
    expect_error(path, UnsupportedFeatureError, ["encrypt", "aes"])


def test_unknown_crypt_method(base, tmp_path):
    path = copy(base, tmp_path, "crypt9.qcow2")
    patch(path, H_CRYPT_METHOD, ">I", 9)
    expect_error(path, (UnsupportedFeatureError, CorruptImageError), ["encrypt", "crypt"])


# ------------------------------------------------------------------ tables
def test_l1_entry_unaligned(base, tmp_path):
    path = copy(base, tmp_path, "l1e.qcow2")
    at = l1_entry_offset(path, 0)
    (e,) = read_at(path, at, ">Q")
    patch(path, at, ">Q", e + 512)
    expect_error(path, CorruptImageError, ["l1", "l2", hex(at), str(at)], stage=("open", "read"))


def test_l1_entry_past_eof(base, tmp_path):
    path = copy(base, tmp_path, "l1eof.qcow2")
    at = l1_entry_offset(path, 0)
    patch(path, at, ">Q", QCOW_OFLAG_COPIED | (1 << 40))
    expect_error(path, CorruptImageError, ["l1", "l2", "eof", "end of"], stage=("open", "read"))


def test_l2_entry_unaligned(base, tmp_path):
    path = copy(base, tmp_path, "l2u.qcow2")
    at = l2_entry_offset(path, CS)
    (e,) = read_at(path, at, ">Q")
    assert e & L2E_OFFSET_MASK
    patch(path, at, ">Q", e + 512)
    expect_error(path, CorruptImageError, ["l2", "align", hex(at), str(at)],
                 stage=("open", "read"))


def test_l2_entry_past_eof(base, tmp_path):
    path = copy(base, tmp_path, "l2eof.qcow2")
    at = l2_entry_offset(path, CS)
    patch(path, at, ">Q", QCOW_OFLAG_COPIED | (1 << 40))
    expect_error(path, CorruptImageError, ["l2", "eof", "end of", "past", hex(1 << 40)],
                 stage=("open", "read"))


def _compressed_entry(path):
    at = l2_entry_offset(path, 4 * CS)
    (e,) = read_at(path, at, ">Q")
    assert e & (1 << 62), "fixture: cluster 4 is not compressed"
    return at, e


def test_compressed_descriptor_past_eof(base, tmp_path):
    path = copy(base, tmp_path, "ceof.qcow2")
    at, e = _compressed_entry(path)
    host, nsec = compressed_descriptor(e, 16)
    far = os.path.getsize(path) + 16 * CS
    patch(path, at, ">Q", make_compressed_entry(far, nsec, 16))
    expect_error(path, CorruptImageError, ["compress", "eof", "end of", hex(far), str(far)],
                 stage=("open", "read"))


def test_compressed_descriptor_huge_sector_count(base, tmp_path):
    """The sector count reaches past EOF (max count, last sector of the file)."""
    path = copy(base, tmp_path, "csec.qcow2")
    at, e = _compressed_entry(path)
    last = os.path.getsize(path) - 512
    patch(path, at, ">Q", make_compressed_entry(last, (1 << 8) - 1, 16))
    expect_error(path, CorruptImageError, ["compress", "eof", "end of", "short", "past"],
                 stage=("open", "read"))


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("garbage", ["ff", "random", "short"])
def test_garbage_compressed_data(tmp_path, ctype, garbage):
    path = qemu_create(tmp_path / f"g-{ctype}.qcow2", MiB, cluster_size=CS,
                       compression_type=ctype)
    qemu_io(path, f"write -q -c -P 0x22 {4 * CS} {CS}")
    at, e = _compressed_entry(path)
    host, nsec = compressed_descriptor(e, 16)
    n = (nsec + 1) * 512 - (host % 512)
    if garbage == "ff":
        blob = b"\xff" * n
    elif garbage == "random":
        blob = bytes((i * 151 + 7) % 256 for i in range(n))
        blob = b"\xff" + blob[1:] if ctype == "zlib" else b"\x00\x00\x00\x00" + blob[4:]
    else:
        # A valid stream that decompresses to far less than a cluster.
        if ctype == "zlib":
            c = zlib.compressobj(6, zlib.DEFLATED, -12)
            blob = c.compress(b"x" * 100) + c.flush()
        else:
            import zstandard
            blob = zstandard.ZstdCompressor().compress(b"x" * 100)
        blob = blob.ljust(n, b"\0")
    patch_bytes(path, host, blob[:n])
    expect_error(path, CorruptImageError, ["compress", "decompress", "zlib", "zstd", "deflate",
                                           hex(host), str(host)], stage=("open", "read"))


def test_refcount_block_past_eof_on_write(base, tmp_path):
    """Allocating needs the refcount block; its pointer is bogus."""
    path = copy(base, tmp_path, "rb.qcow2")
    h = header(path)
    patch(path, h["refcount_table_offset"], ">Q", 1 << 40)
    # Reading does not need refcounts, but writing (allocating) does.
    res = attempt(path, "r+", "write")
    assert "exc" in res, f"write through a bogus refcount table succeeded: {res}"
    assert "CorruptImageError" in res["mro"], res


def test_write_into_metadata_is_refused(base, tmp_path):
    """An L2 entry pointing at the refcount table: an in-place write there would
    destroy metadata.  It must fail with CorruptImageError, leave the refcount
    table intact, and (as qemu does) mark the image corrupt."""
    path = copy(base, tmp_path, "overlap.qcow2")
    h = header(path)
    rt = h["refcount_table_offset"]
    at = l2_entry_offset(path, 0)
    patch(path, at, ">Q", QCOW_OFLAG_COPIED | rt)
    with open(path, "rb") as f:
        f.seek(rt)
        table_before = f.read(CS)
    img = qcow2fast.open(path, "r+")
    try:
        with pytest.raises(CorruptImageError):
            img.write(0, b"\xee" * 4096)
            img.flush()
        with pytest.raises((CorruptImageError, ReadOnlyImageError)):
            img.write(2 * CS, b"\xee" * 4096)
            img.flush()
    finally:
        try:
            img.close()
        except Qcow2Error:
            pass
    with open(path, "rb") as f:
        f.seek(rt)
        assert f.read(CS) == table_before, "the refcount table was overwritten"
    assert is_marked_corrupt(path), "corruption found while writing must set the corrupt bit"


# ------------------------------------------------------------------ snapshot table
SNAPSHOT_CASES = [
    # name, offset in the first entry, fmt, value
    ("l1_unaligned", 0, ">Q", "L1+8"),
    ("l1_past_eof", 0, ">Q", 1 << 40),
    ("l1_size_huge", 8, ">I", 0xFFFFFFFF),
    ("extra_data_huge", 36, ">I", 0xFFFFFFF0),
    ("names_past_eof", 12, ">HH", (0xFFFF, 0xFFFF)),
]


@pytest.mark.parametrize("case", SNAPSHOT_CASES, ids=[c[0] for c in SNAPSHOT_CASES])
def test_bad_snapshot_table_entry(base, tmp_path, case):
    """qemu refuses to open these; qcow2fast must raise CorruptImageError (at
    open, or at the latest before writing) -- never crash or allocate hugely."""
    name, off, fmt, value = case
    path = copy(base, tmp_path, f"snap-{name}.qcow2")
    qemu_img("snapshot", "-c", "s1", path)
    h = header(path)
    entry = h["snapshots_offset"]
    if value == "L1+8":
        (l1,) = read_at(path, entry, ">Q")
        value = l1 + 8
    patch(path, entry + off, fmt, *(value if isinstance(value, tuple) else (value,)))
    # The file is small: make "past EOF" true for names too.
    res = attempt(path)
    if "exc" in res:
        assert "CorruptImageError" in res["mro"], res
        assert "snapshot" in res["msg"].lower(), res["msg"]
    res = attempt(path, "r+", "write")
    assert "exc" in res and "CorruptImageError" in res["mro"], (
        f"writing an image with a malformed snapshot table: {res}")


def test_snapshot_table_past_eof(base, tmp_path):
    path = copy(base, tmp_path, "snapeof.qcow2")
    qemu_img("snapshot", "-c", "s1", path)
    h = header(path)
    # qemu writes the snapshot table last: cutting it loses nothing else.
    assert os.path.getsize(path) <= h["snapshots_offset"] + CS
    os.truncate(path, h["snapshots_offset"] + 45)  # the entry's id/name are cut off
    expect_error(path, CorruptImageError, ["snapshot"], stage=("open", "read"))


# ------------------------------------------------------------------ corrupt bit
def test_corrupt_bit_opens_read_only(base, tmp_path):
    path = copy(base, tmp_path, "corrupt.qcow2")
    h = header(path)
    patch(path, H_INCOMPATIBLE, ">Q", h["incompatible_features"] | INCOMPAT_CORRUPT)
    expected = qemu_raw(path)
    with qcow2fast.open(path) as img:
        assert img.corrupt
        assert "corrupt bit" in img.features["incompatible"]
        assert img.read(0, img.size) == expected
        with pytest.raises(ReadOnlyImageError):
            img.write(0, b"x")
    before = file_state(path)
    try:
        img = qcow2fast.open(path, "r+")
    except Qcow2Error:
        pass                                   # refusing r+ is fine
    else:
        with img:
            assert img.read_only and img.corrupt
            for op in (lambda: img.write(0, b"x"), lambda: img.write_zeroes(0, 512),
                       lambda: img.discard(0, CS), lambda: img.writev([(0, b"y")])):
                with pytest.raises(ReadOnlyImageError):
                    op()
    assert file_state(path) == before, "a corrupt image was modified"


# ------------------------------------------------------------------ read-only
def _exercise_read_only(img):
    size = img.size
    img.read(0, size)
    img.readv([(0, 100), (size - 100, 100)])
    img.block_status()
    f = img.as_file()
    f.seek(0)
    f.read(1000)
    for op in (lambda: img.write(0, b"x"), lambda: img.write_zeroes(0, 512),
               lambda: img.discard(0, 65536), lambda: img.writev([(0, b"y")])):
        with pytest.raises(ReadOnlyImageError):
            op()
    img.flush()


@pytest.mark.parametrize("kind", ["plain", "v2", "lazy_dirty", "snapshot", "backing"])
def test_read_only_open_never_modifies(tmp_path, kind):
    path = qemu_create(tmp_path / "ro.qcow2", 2 * MiB, cluster_size=4096,
                       compat="0.10" if kind == "v2" else "1.1",
                       **({"lazy_refcounts": "on"} if kind == "lazy_dirty" else {}))
    others = []
    cmds = [f"write -q -P 0x44 0 {MiB}", "write -q -c -P 0x45 1M 4096"]
    if kind == "lazy_dirty":
        p = qemu_io(path, *cmds, "flush", "sigraise 9", check=False)
        assert p.returncode in (-9, 137)
        assert header(path)["incompatible_features"] & 1
    else:
        qemu_io(path, *cmds)
    if kind == "snapshot":
        qemu_img("snapshot", "-c", "s1", path)
        qemu_io(path, "write -q -P 0x46 0 4096")
    if kind == "backing":
        top = qemu_create(tmp_path / "top.qcow2", 2 * MiB, backing="ro.qcow2")
        qemu_io(top, "write -q -P 0x47 8192 4096")
        others, path = [path], top
    states = {p: file_state(p) for p in [path] + others}
    with qcow2fast.open(path) as img:
        assert img.read_only
        _exercise_read_only(img)
        if kind == "lazy_dirty":
            assert img.dirty
    for p, st in states.items():
        assert file_state(p) == st, f"read-only open modified {p}"


def test_closed_image_raises(base):
    img = qcow2fast.open(base)
    img.close()
    with pytest.raises(ImageClosedError):
        img.read(0, 1)
