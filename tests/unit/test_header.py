"""The header (spec/header.py): ``Header.pack()`` then ``parse_header()``
gives back every field -- v2 and v3, backing file and format, extended L2
entries, zstd, a longer header carrying fields this version does not know,
unknown header extensions -- and packing the parsed header again gives the
same bytes.  Headers qemu-img creates parse to what ``qemu-img info`` says."""

import dataclasses
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from qcow2fast.errors import CorruptImageError, UnsupportedFeatureError
from qcow2fast.spec.geometry import Geometry
from qcow2fast.spec.header import EXT_BEFORE_FEATURE_TABLE
from qcow2fast.spec.header import (AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, COMPRESSION_NAMES,
                                   COMPRESSION_ZSTD, EXT_BACKING_FORMAT, EXT_BITMAPS,
                                   EXT_DATA_FILE, EXT_END, EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION,
                                   INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
                                   INCOMPAT_EXTL2, KNOWN_FEATURES, V2_HEADER_LENGTH, Header,
                                   HeaderExtension, check_features, parse_header)
from tests.helpers.qemu_util import (H_HEADER_LENGTH, MiB, header, qemu_create, qemu_img,
                                     qemu_info)

# parse_header bounds every table by the file size: a file this large holds
# all of them.
FILE_SIZE = 1 << 50
KNOWN_NAMES = {(kind, bit): name for kind, bit, name in KNOWN_FEATURES}


def make_header(version=3, cluster_bits=16, size=MiB << 10, **fields):
    """A valid header: L1 table, refcount table and one snapshot table at
    cluster-aligned offsets, L1 big enough for ``size``."""
    cs = 1 << cluster_bits
    extended = bool(fields.get("incompatible_features", 0) & INCOMPAT_EXTL2)
    geo = Geometry(cluster_bits, fields.get("refcount_order", 4), extended_l2=extended)
    base = dict(version=version, cluster_bits=cluster_bits, size=size,
                l1_size=geo.l1_size_for(size), l1_table_offset=3 * cs,
                refcount_table_offset=cs, refcount_table_clusters=1, nb_snapshots=2,
                snapshots_offset=7 * cs)
    if version == 2:
        base.update(header_length=V2_HEADER_LENGTH, refcount_order=4)
    base.update(fields)
    return Header(**base)


def round_trip(h):
    """Pack ``h``, parse it back, check every field and the backing name's
    place; return (bytes, parsed header)."""
    before = dataclasses.asdict(h)
    buf = h.pack()
    assert len(buf) <= h.cluster_size
    assert buf[:4] == b"QFI\xfb"
    parsed = parse_header(buf, FILE_SIZE)
    got = dataclasses.asdict(parsed)
    # pack places the backing file name (after the extensions) and fills in
    # its offset and size; everything else must come back as it was.
    for field in ("backing_file_offset", "backing_file_size", "feature_names"):
        del before[field], got[field]
    if h.version >= 3:
        before["header_length"] = max(before["header_length"], 112)
    # pack writes the extensions qemu places before the feature table first
    # (data file, full disk encryption), the others after, each in order.
    exts = before["other_extensions"]
    before["other_extensions"] = [e for e in exts if e["type"] in EXT_BEFORE_FEATURE_TABLE] + \
        [e for e in exts if e["type"] not in EXT_BEFORE_FEATURE_TABLE]
    assert got == before
    if h.backing_file:
        name = h.backing_file.encode()
        assert (parsed.backing_file_offset, parsed.backing_file_size) == \
            (h.backing_file_offset, len(name))
        assert buf[parsed.backing_file_offset:] == name
    else:
        assert parsed.backing_file_offset == parsed.backing_file_size == 0
    # Rewriting the parsed header changes nothing.
    assert parsed.pack() == buf
    return buf, parsed


def extensions_in(buf, start):
    """[(type, data)] of the extension area of a packed header."""
    out, pos = [], start
    while True:
        kind, n = struct.unpack_from(">II", buf, pos)
        if kind == EXT_END:
            return out
        out.append((kind, bytes(buf[pos + 8:pos + 8 + n])))
        pos += 8 + n + (-n % 8)


# -- round trips of headers made here ---------------------------------------------------


def test_v3_defaults_with_the_feature_table():
    buf, parsed = round_trip(make_header(compatible_features=COMPAT_LAZY_REFCOUNTS))
    assert parsed.header_length == 112 and len(buf) > 112
    assert parsed.feature_names == KNOWN_NAMES
    assert [t for t, _ in extensions_in(buf, 112)] == [EXT_FEATURE_TABLE]


def test_v2_is_72_bytes_without_a_feature_table():
    buf, parsed = round_trip(make_header(version=2))
    assert parsed.version == 2 and parsed.header_length == V2_HEADER_LENGTH
    assert (parsed.incompatible_features, parsed.compatible_features,
            parsed.autoclear_features, parsed.refcount_order) == (0, 0, 0, 4)
    assert parsed.feature_names == {}
    assert extensions_in(buf, V2_HEADER_LENGTH) == []


@pytest.mark.parametrize("version", [2, 3])
def test_backing_file_and_format(version):
    h = make_header(version=version, backing_file="../base images/bäse.qcow2",
                    backing_format="qcow2")
    buf, parsed = round_trip(h)
    assert parsed.backing_file == "../base images/bäse.qcow2"
    assert parsed.backing_format == "qcow2"
    exts = extensions_in(buf, parsed.header_length)
    assert exts[0] == (EXT_BACKING_FORMAT, b"qcow2")
    # The name follows the end-of-extensions marker.
    assert parsed.backing_file_offset >= parsed.header_length + sum(
        8 + len(d) + (-len(d) % 8) for _, d in exts) + 8


def test_extended_l2_entries():
    h = make_header(cluster_bits=17, incompatible_features=INCOMPAT_EXTL2)
    _, parsed = round_trip(h)
    assert parsed.incompatible_features == INCOMPAT_EXTL2
    check_features(parsed, writable=True)


def test_zstd_compression_type():
    h = make_header(incompatible_features=INCOMPAT_COMPRESSION, compression_type=COMPRESSION_ZSTD)
    buf, parsed = round_trip(h)
    assert buf[104] == COMPRESSION_ZSTD
    assert parsed.compression_type == COMPRESSION_ZSTD
    check_features(parsed, writable=True)


def test_longer_header_keeps_unknown_additional_fields():
    """header_length 136: 31 bytes after compression_type that a later
    version defines are kept, byte for byte, on rewrite."""
    extra = bytes(range(1, 32))
    h = make_header(header_length=136, extra_fields=extra)
    buf, parsed = round_trip(h)
    assert struct.unpack_from(">I", buf, H_HEADER_LENGTH)[0] == 136
    assert buf[105:136] == extra
    assert parsed.extra_fields == extra
    # Extensions start after the longer header.
    assert extensions_in(buf, 136)[0][0] == EXT_FEATURE_TABLE


def test_unknown_extensions_are_kept_in_order():
    others = [HeaderExtension(0x12345678, b"first"), HeaderExtension(0x0BADCAFE, b""),
              HeaderExtension(0x7FFFFFFF, bytes(range(40))),
              HeaderExtension(EXT_BITMAPS, b"x" * 24)]
    h = make_header(backing_file="b", backing_format="raw", other_extensions=list(others))
    buf, parsed = round_trip(h)
    assert parsed.other_extensions == others
    assert [t for t, _ in extensions_in(buf, 112)] == \
        [EXT_BACKING_FORMAT, EXT_FEATURE_TABLE] + [e.type for e in others]


def test_unknown_feature_names_are_kept():
    names = {(0, 17): "a future incompatible feature", (2, 9): "a future autoclear bit"}
    _, parsed = round_trip(make_header(feature_names=dict(names)))
    assert parsed.feature_names == {**KNOWN_NAMES, **names}
    assert parsed.feature_name(0, 17) == "a future incompatible feature"


def test_small_clusters_drop_the_feature_table_before_the_backing_name():
    """512-byte clusters: the feature table is left out (qemu writes it only
    with clusters over 4 KiB), so a long backing name fits; a name that does
    not fit even then is refused."""
    name = "n" * 300
    buf, parsed = round_trip(make_header(cluster_bits=9, size=MiB, backing_file=name))
    assert parsed.feature_names == {}
    assert EXT_FEATURE_TABLE not in [t for t, _ in extensions_in(buf, 112)]
    with pytest.raises(UnsupportedFeatureError, match="more than one cluster"):
        make_header(cluster_bits=9, size=MiB, backing_file="n" * 400).pack()


def test_fields_sit_at_the_offsets_of_the_spec():
    """The packed header fields sit at the offsets of qcow2.txt."""
    h = make_header(incompatible_features=INCOMPAT_DIRTY, compatible_features=1,
                    autoclear_features=AUTOCLEAR_BITMAPS, refcount_order=6)
    buf, _ = round_trip(h)
    want = {8: (0, ">Q"), 20: (16, ">I"), 24: (h.size, ">Q"), 36: (h.l1_size, ">I"),
            40: (h.l1_table_offset, ">Q"), 48: (h.refcount_table_offset, ">Q"),
            56: (1, ">I"), 60: (2, ">I"), 64: (h.snapshots_offset, ">Q"),
            72: (INCOMPAT_DIRTY, ">Q"), 80: (1, ">Q"), 88: (AUTOCLEAR_BITMAPS, ">Q"),
            96: (6, ">I"), 100: (112, ">I")}
    for off, (value, fmt) in want.items():
        assert struct.unpack_from(fmt, buf, off)[0] == value, f"field at {off}"


# -- random headers ------------------------------------------------------------------------

_EXT_TYPES = st.integers(1, 0xFFFFFFFF).filter(
    lambda t: t not in (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE))


@st.composite
def headers(draw):
    version = draw(st.sampled_from([2, 3]))
    cluster_bits = draw(st.integers(12, 21))
    cs = 1 << cluster_bits
    fields = {}
    if version == 3:
        length = draw(st.integers(14, 24)) * 8
        fields.update(
            refcount_order=draw(st.integers(0, 6)),
            incompatible_features=draw(st.integers(0, (1 << 64) - 1)),
            compatible_features=draw(st.integers(0, (1 << 64) - 1)),
            autoclear_features=draw(st.integers(0, (1 << 64) - 1)),
            compression_type=draw(st.integers(0, 255)),
            header_length=length,
            extra_fields=draw(st.binary(min_size=length - 105, max_size=length - 105)))
    types = draw(st.lists(_EXT_TYPES, max_size=4, unique=True))
    fields["other_extensions"] = [HeaderExtension(t, draw(st.binary(max_size=40))) for t in types]
    if draw(st.booleans()):
        fields["backing_file"] = draw(st.text(st.characters(blacklist_categories=("Cs",),
                                                            blacklist_characters="\0"),
                                              min_size=1, max_size=60))
    if draw(st.booleans()):
        fields["backing_format"] = draw(st.sampled_from(["qcow2", "raw", "vmdk", "x" * 30]))
    size = draw(st.integers(0, 1 << 42)) // 512 * 512
    h = make_header(version=version, cluster_bits=cluster_bits, size=size, **fields)
    h.l1_size += draw(st.integers(0, 3))
    h.l1_table_offset = draw(st.integers(1, 1 << 20)) * cs
    h.refcount_table_offset = draw(st.integers(1, 1 << 20)) * cs
    h.refcount_table_clusters = draw(st.integers(1, (8 << 20) // cs))
    h.nb_snapshots = draw(st.integers(0, 65536))
    h.snapshots_offset = draw(st.integers(1, 1 << 20)) * cs if h.nb_snapshots else 0
    return h


@given(headers())
@settings(max_examples=300, deadline=None)
def test_random_headers_round_trip(h):
    if h.l1_size > (32 << 20) // 8:
        with pytest.raises(CorruptImageError, match="l1_size"):
            parse_header(h.pack(), FILE_SIZE)
        return
    _, parsed = round_trip(h)
    # qemu's rule: the feature-name table in v3 images with clusters over 4 KiB.
    if parsed.version == 3 and parsed.cluster_size > 4096:
        assert parsed.feature_names == KNOWN_NAMES
    else:
        assert parsed.feature_names == {}


# -- headers qemu-img creates -----------------------------------------------------------

QEMU_CASES = {
    "v2": dict(compat="0.10"),
    "v3-512b-rb1": dict(cluster_size=512, refcount_bits=1),
    "v3-4k-rb2-lazy": dict(cluster_size=4096, refcount_bits=2, lazy_refcounts="on"),
    "v3-2m-rb64": dict(cluster_size=2 * MiB, refcount_bits=64),
    "extended-l2": dict(cluster_size=128 * 1024, extended_l2="on"),
    "zstd": dict(compression_type="zstd"),
    "zstd-extl2-lazy-rb8": dict(compression_type="zstd", extended_l2="on", lazy_refcounts="on",
                                refcount_bits=8, cluster_size=32 * 1024),
    "prealloc-metadata": dict(preallocation="metadata", cluster_size=16 * 1024),
    "backing": dict(backing=True),
    "backing-v2": dict(backing=True, compat="0.10"),
    "backing-512b": dict(backing=True, cluster_size=512),
    "data-file": dict(data_file=True),
    "bitmap": dict(bitmap=True),
}


def qemu_image(tmp_path, case):
    opts = dict(QEMU_CASES[case])
    backing = opts.pop("backing", False)
    data_file = opts.pop("data_file", False)
    bitmap = opts.pop("bitmap", False)
    if backing:
        base = qemu_create(tmp_path / "base image.qcow2", 48 * MiB)
        opts.update(backing=os.path.basename(base), backing_fmt="qcow2")
    if data_file:
        opts["data_file"] = str(tmp_path / "data.raw")
    path = qemu_create(tmp_path / "img.qcow2", 48 * MiB + 512, **opts)
    if bitmap:
        qemu_img("bitmap", "--add", path, "b0")
    return path


def read_header(path):
    with open(path, "rb") as f:
        buf = f.read(2 * MiB)
    return buf, parse_header(buf, os.path.getsize(path))


@pytest.mark.qemu
@pytest.mark.parametrize("case", list(QEMU_CASES))
def test_qemu_created_headers_parse_as_qemu_info_says(tmp_path, case):
    path = qemu_image(tmp_path, case)
    buf, h = read_header(path)
    info = qemu_info(path)
    data = info["format-specific"]["data"]
    assert h.size == info["virtual-size"]
    assert h.cluster_size == info["cluster-size"]
    assert h.version == {"0.10": 2, "1.1": 3}[data["compat"]]
    assert h.refcount_bits == data["refcount-bits"]
    assert COMPRESSION_NAMES[h.compression_type] == data["compression-type"]
    assert bool(h.incompatible_features & INCOMPAT_COMPRESSION) == \
        (h.compression_type != 0)
    assert bool(h.incompatible_features & INCOMPAT_DIRTY) == info["dirty-flag"]
    if h.version == 3:
        assert bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS) == data["lazy-refcounts"]
        assert bool(h.incompatible_features & INCOMPAT_CORRUPT) == data["corrupt"]
        assert bool(h.incompatible_features & INCOMPAT_EXTL2) == data["extended-l2"]
    assert h.backing_file == info.get("backing-filename")
    assert h.backing_format == info.get("backing-filename-format")
    others = {e.type: e.data for e in h.other_extensions}
    if "data-file" in data:
        assert h.incompatible_features & INCOMPAT_DATA_FILE
        assert others[EXT_DATA_FILE].decode() == data["data-file"]
    else:
        assert EXT_DATA_FILE not in others
    assert (EXT_BITMAPS in others) == ("bitmaps" in data)
    assert bool(h.autoclear_features & AUTOCLEAR_BITMAPS) == ("bitmaps" in data)
    # qemu sizes the L1 table exactly for the disk.
    geo = Geometry(h.cluster_bits, h.refcount_order,
                   extended_l2=bool(h.incompatible_features & INCOMPAT_EXTL2))
    assert h.l1_size == geo.l1_size_for(h.size)
    # The test helpers' own struct reading agrees on every field they know.
    for name, value in header(path).items():
        if name != "magic":
            assert getattr(h, name) == value, name
    # Whatever qemu named in its feature table is what qcow2fast knows.
    for key, name in h.feature_names.items():
        assert KNOWN_NAMES[key] == name
    if "data-file" not in data:
        check_features(h, writable="bitmaps" not in data)
    # Packing the parsed header gives the same fields back.
    again = parse_header(h.pack(), os.path.getsize(path))
    for field in dataclasses.fields(Header):
        if field.name not in ("feature_names", "backing_file_offset", "backing_file_size"):
            assert getattr(again, field.name) == getattr(h, field.name), field.name


@pytest.mark.qemu
@pytest.mark.parametrize("case", QEMU_CASES)
def test_qemu_created_headers_repack_byte_for_byte(tmp_path, case):
    """qcow2fast writes cluster 0 as qemu does: same fields, extensions in
    the same order, same feature table, the backing name in the same place."""
    path = qemu_image(tmp_path, case)
    buf, h = read_header(path)
    packed = h.pack()
    assert packed == buf[:len(packed)]
    assert buf[len(packed):h.cluster_size] == bytes(h.cluster_size - len(packed))
