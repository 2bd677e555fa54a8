"""Malformed images: a clear Qcow2Error, never a crash, hang or huge allocation.

Each malformed file is made by patching bytes of a qemu-made image at the
offsets of docs/interop/qcow2.txt.  The attempt (open, then read everything)
runs in a child Python with a 1 GiB address-space limit and a timeout, so a
hang or an unbounded allocation fails the test instead of the machine.  The
error must be the expected subclass, its message must name the field or
offset, and a read-only attempt must leave the file untouched.
"""

import os
import struct

import pytest

import qcow2fast
from qcow2fast.errors import (CorruptImageError, InvalidArgumentError, MissingSecretError,
                              Qcow2Error, UnsupportedFeatureError)
from tests.helpers.bad_input import CS, attempt, copy, expect_error, make_base
from tests.helpers.qemu_util import (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, H_BACKING_FILE_OFFSET,
                                     H_CLUSTER_BITS, H_COMPRESSION_TYPE, H_CRYPT_METHOD,
                                     H_HEADER_LENGTH, H_INCOMPATIBLE, H_L1_SIZE, H_L1_TABLE_OFFSET,
                                     H_MAGIC, H_NB_SNAPSHOTS, H_REFCOUNT_ORDER,
                                     H_REFCOUNT_TABLE_CLUSTERS, H_REFCOUNT_TABLE_OFFSET, H_SIZE,
                                     H_VERSION, INCOMPAT_COMPRESSION, MiB,
                                     header, patch, patch_bytes, qemu_create,
                                     qemu_img, qemu_raw, read_extensions, write_extensions)

pytestmark = pytest.mark.qemu


@pytest.fixture
def base(tmp_path):
    return make_base(tmp_path)


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
    # qemu's words: the bits the image does not name, as a hex mask
    res = expect_error(path, UnsupportedFeatureError, [f"{1 << 40:x}"])
    assert "Unknown incompatible feature: 10000000000" in res["msg"], res["msg"]


def test_unknown_compatible_and_autoclear_bits_are_fine(base, tmp_path):
    path = copy(base, tmp_path, "compat.qcow2")
    patch(path, 80, ">QQ", 1 << 7, 0)
    res = attempt(path)
    assert "exc" not in res, res


def test_external_data_file_missing(tmp_path):
    """(external data files themselves: tests/interop/test_datafile.py)"""
    path = qemu_create(tmp_path / "d.qcow2", MiB, data_file=str(tmp_path / "d.raw"))
    os.unlink(tmp_path / "d.raw")
    expect_error(path, FileNotFoundError, ["data_file"])
    expect_error(path, FileNotFoundError, ["data_file"], mode="r+", action="write")


def test_luks_encryption(tmp_path):
    path = str(tmp_path / "luks.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456",
             "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
             path, "1M")
    assert header(path)["crypt_method"] == 2
    # supported now: without its secret, qemu's message naming the parameter
    expect_error(path, InvalidArgumentError, ["encrypt.key-secret"])


def test_aes_encryption_without_its_secret(base, tmp_path):
    """Legacy AES (crypt_method 1) is read with its passphrase; without one
    the open names the missing parameter, as qemu does."""
    path = copy(base, tmp_path, "aes.qcow2")
    patch(path, H_CRYPT_METHOD, ">I", 1)
    expect_error(path, MissingSecretError, ["encrypt.key-secret"])


def test_unknown_crypt_method(base, tmp_path):
    path = copy(base, tmp_path, "crypt9.qcow2")
    patch(path, H_CRYPT_METHOD, ">I", 9)
    expect_error(path, (UnsupportedFeatureError, CorruptImageError), ["encrypt", "crypt"])
