"""The qcow2 header, its header extensions and the feature-name table.

Every on-disk structure here is declared once (a ``struct.Struct``) and used
both to parse and to write, so the two can never drift apart.  Parsing
validates every field against the file it came from and raises
:class:`CorruptImageError` naming the field and its offset.
"""

import dataclasses
import struct

from ..errors import CorruptImageError, UnsupportedFeatureError
from .constants import L1E_SIZE, SC_BITS
from .geometry import Geometry

QCOW_MAGIC = b"QFI\xfb"

# Header fields up to header_length (version 3 layout; version 2 stops at 72),
# each with its struct code.  HEADER, FIELD_OFFSET and FIELD_STRUCT all
# derive from this one list.
_FIELDS = [
    ("magic", "4s"), ("version", "I"), ("backing_file_offset", "Q"),
    ("backing_file_size", "I"), ("cluster_bits", "I"), ("size", "Q"),
    ("crypt_method", "I"), ("l1_size", "I"), ("l1_table_offset", "Q"),
    ("refcount_table_offset", "Q"), ("refcount_table_clusters", "I"),
    ("nb_snapshots", "I"), ("snapshots_offset", "Q"), ("incompatible_features", "Q"),
    ("compatible_features", "Q"), ("autoclear_features", "Q"), ("refcount_order", "I"),
    ("header_length", "I"),
]
HEADER = struct.Struct(">" + "".join(code for _, code in _FIELDS))
HEADER_FIELDS = tuple(name for name, _ in _FIELDS)
FIELD_STRUCT = {name: struct.Struct(">" + code) for name, code in _FIELDS}
FIELD_OFFSET = {}
_pos = 0
for _name, _code in _FIELDS:
    FIELD_OFFSET[_name] = _pos
    _pos += FIELD_STRUCT[_name].size
del _pos, _name, _code


def pack_fields(**fields):
    """(offset, bytes) of a run of consecutive header fields, given by name
    in header order with their values: one write that updates them in place
    (``pack_fields(l1_size=n, l1_table_offset=off)``)."""
    names = list(fields)
    first = HEADER_FIELDS.index(names[0])
    if list(HEADER_FIELDS[first:first + len(names)]) != names:
        raise ValueError(f"header fields {', '.join(names)} do not follow each other")
    fmt = ">" + "".join(FIELD_STRUCT[name].format.lstrip(">") for name in names)
    return FIELD_OFFSET[names[0]], struct.pack(fmt, *fields.values())

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = HEADER.size          # 104
V3_HEADER_LENGTH = 112                      # 104 + compression_type + padding
COMPRESSION_TYPE_OFFSET = 104

EXT_HEADER = struct.Struct(">II")           # type, length
FEATURE_ENTRY = struct.Struct(">BB46s")     # type, bit, name

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
EXT_BEFORE_FEATURE_TABLE = (EXT_DATA_FILE, EXT_CRYPTO)

# Feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

FEATURE_INCOMPAT, FEATURE_COMPAT, FEATURE_AUTOCLEAR = 0, 1, 2

# The feature-name table qcow2fast writes (the names qemu uses).
KNOWN_FEATURES = [
    (FEATURE_INCOMPAT, 0, "dirty bit"),
    (FEATURE_INCOMPAT, 1, "corrupt bit"),
    (FEATURE_INCOMPAT, 2, "external data file"),
    (FEATURE_INCOMPAT, 3, "compression type"),
    (FEATURE_INCOMPAT, 4, "extended L2 entries"),
    (FEATURE_COMPAT, 0, "lazy refcounts"),
    (FEATURE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_AUTOCLEAR, 1, "raw external data"),
]

# Incompatible bits this version can read and write.
SUPPORTED_INCOMPAT = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION
                      | INCOMPAT_EXTL2)

COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
# qemu writes the feature-name table only with clusters larger than 4 KiB:
# its 8 names take 392 bytes (qcow2_update_header).
FEATURE_TABLE_MIN_CLUSTER_BITS = 13
# Extended L2 entries need subclusters of at least 512 bytes (qemu's rule).
MIN_EXTL2_CLUSTER_BITS = SC_BITS + 9
MAX_BACKING_FILE_SIZE = 1023
# qemu's implementation limits, kept so no lying size field can make us
# allocate without bound.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
# qemu's l1_vm_state_index is an int: a virtual size needing more L1 entries
# is "too big" for it.
QEMU_MAX_L1_INDEX = (1 << 31) - 1


@dataclasses.dataclass
class HeaderExtension:
    type: int
    data: bytes


@dataclasses.dataclass
class Header:
    """An in-memory qcow2 header, with its extensions and backing file name."""

    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    # Bytes of additional fields after compression_type (offset 105 up to
    # header_length) that this version does not know: kept on rewrite.
    extra_fields: bytes = b"\0" * 7
    backing_file: str = None
    backing_format: str = None
    feature_names: dict = dataclasses.field(default_factory=dict)
    # Extensions other than backing format and feature table, in file order.
    other_extensions: list = dataclasses.field(default_factory=list)

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self):
        return 1 << self.refcount_order

    def feature_name(self, kind, bit):
        name = self.feature_names.get((kind, bit))
        if name is None:
            for k, b, n in KNOWN_FEATURES:
                if (k, b) == (kind, bit):
                    return n
            kinds = {FEATURE_INCOMPAT: "incompatible", FEATURE_COMPAT: "compatible",
                     FEATURE_AUTOCLEAR: "autoclear"}
            return f"unknown {kinds[kind]} feature bit {bit}"
        return name

    # -- writing -----------------------------------------------------------

    def pack(self):
        """Serialise header, extensions and backing file name (cluster 0).

        As qemu does, the feature-name table is written only with clusters
        larger than 4 KiB (FEATURE_TABLE_MIN_CLUSTER_BITS): in a small first
        cluster it would crowd out the backing file name."""
        out = self._pack(feature_table=self.cluster_bits >= FEATURE_TABLE_MIN_CLUSTER_BITS)
        if len(out) > self.cluster_size:
            raise UnsupportedFeatureError(
                f"header, extensions and backing file name take {len(out)} bytes, "
                f"more than one cluster ({self.cluster_size} bytes)")
        return out

    def _pack(self, feature_table):
        if self.version == 2:
            length = V2_HEADER_LENGTH
        else:
            length = max(self.header_length, V3_HEADER_LENGTH)
            self.header_length = length
        values = dict((f, getattr(self, f, None)) for f in HEADER_FIELDS)
        values["magic"] = QCOW_MAGIC
        if self.version == 2:
            for f in ("incompatible_features", "compatible_features", "autoclear_features",
                      "refcount_order", "header_length"):
                values[f] = 0
        out = bytearray(HEADER.pack(*(values[f] for f in HEADER_FIELDS)))
        del out[length:]
        if self.version >= 3:
            tail = bytes([self.compression_type]) + self.extra_fields
            out += tail[: length - COMPRESSION_TYPE_OFFSET].ljust(length - COMPRESSION_TYPE_OFFSET, b"\0")

        def ext(kind, data):
            out.extend(EXT_HEADER.pack(kind, len(data)))
            out.extend(data)
            out.extend(b"\0" * (-len(data) % 8))

        if self.backing_format:
            ext(EXT_BACKING_FORMAT, self.backing_format.encode())
        # qemu's order: backing format, these, the feature table, the rest.
        early = [e for e in self.other_extensions if e.type in EXT_BEFORE_FEATURE_TABLE]
        for e in early:
            ext(e.type, e.data)
        if self.version >= 3 and feature_table:
            names = dict(((k, b), n) for k, b, n in KNOWN_FEATURES)
            names.update(self.feature_names)
            table = b"".join(FEATURE_ENTRY.pack(k, b, n.encode()[:46])
                             for (k, b), n in sorted(names.items()))
            ext(EXT_FEATURE_TABLE, table)
        for e in self.other_extensions:
            if e not in early:
                ext(e.type, e.data)
        ext(EXT_END, b"")
        if self.backing_file:
            name = self.backing_file.encode()
            self.backing_file_offset = len(out)
            self.backing_file_size = len(name)
        else:
            name = b""
            self.backing_file_offset = self.backing_file_size = 0
        at, fields = pack_fields(backing_file_offset=self.backing_file_offset,
                                 backing_file_size=self.backing_file_size)
        out[at:at + len(fields)] = fields
        return bytes(out + name)


def _check(cond, message, field, qemu=None):
    if not cond:
        raise CorruptImageError(message, offset=FIELD_OFFSET.get(field), field=field, qemu=qemu)


def read_header(f, file_size, check=False):
    """Read and parse the header cluster of the file ``f`` (its
    ``pread(offset, n)``): 4 KiB, then the rest of cluster 0 when the
    cluster is larger (the header, its extensions and the backing file name
    are all in cluster 0; nothing past it is read, so a read of the image's
    data cannot fail an open)."""
    head = f.pread(0, min(file_size, 4096))
    if len(head) >= V2_HEADER_LENGTH:
        at = FIELD_OFFSET["cluster_bits"]
        bits = min(max(int.from_bytes(head[at:at + 4], "big"), MIN_CLUSTER_BITS),
                   MAX_CLUSTER_BITS)
        if min(file_size, 1 << bits) > len(head):
            head = f.pread(0, min(file_size, 1 << bits))
    return parse_header(head, file_size, check)


def parse_header(buf, file_size, check=False):
    """Parse and validate the header area ``buf`` (the image's first bytes).

    ``buf`` must hold at least one cluster or the whole file if shorter.
    ``file_size`` is the size of the image file, used to bound every offset.
    ``check``: for qemu-img check, which also opens an image without a
    refcount table (qemu's BDRV_O_CHECK) to rebuild one.
    """
    if len(buf) < V2_HEADER_LENGTH:
        raise CorruptImageError(f"file is {file_size} bytes, too small for a qcow2 header",
                                offset=0, field="magic")
    raw = bytes(buf[:HEADER.size]).ljust(HEADER.size, b"\0")
    fields = dict(zip(HEADER_FIELDS, HEADER.unpack(raw)))
    if fields["magic"] != QCOW_MAGIC:
        raise CorruptImageError(f"bad magic {fields['magic']!r}, not a qcow2 image",
                                offset=0, field="magic")
    version = fields["version"]
    if version not in (2, 3):
        raise UnsupportedFeatureError(f"unsupported qcow2 version {version}", feature="version")
    if version == 2:
        for f in ("incompatible_features", "compatible_features", "autoclear_features"):
            fields[f] = 0
        fields["refcount_order"] = 4
        fields["header_length"] = V2_HEADER_LENGTH
    del fields["magic"]
    h = Header(**fields)
    cb = h.cluster_bits
    _check(MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS,
           f"cluster_bits {cb} out of range [{MIN_CLUSTER_BITS}, {MAX_CLUSTER_BITS}]",
           "cluster_bits")
    cs = 1 << cb
    if version == 3:
        _check(h.header_length >= V3_MIN_HEADER_LENGTH and h.header_length % 8 == 0,
               f"header_length {h.header_length} must be >= 104 and a multiple of 8",
               "header_length")
        _check(h.header_length <= cs, f"header_length {h.header_length} exceeds the cluster size",
               "header_length")
        _check(len(buf) >= min(h.header_length, cs) or file_size >= h.header_length,
               "header runs past the end of the file", "header_length")
        if h.header_length > COMPRESSION_TYPE_OFFSET:
            h.compression_type = buf[COMPRESSION_TYPE_OFFSET]
            h.extra_fields = bytes(buf[COMPRESSION_TYPE_OFFSET + 1:h.header_length])
        else:
            h.compression_type = 0
            h.extra_fields = b""
    _check(h.refcount_order <= 6, f"refcount_order {h.refcount_order} exceeds 6",
           "refcount_order")

    # Offsets and table sizes, bounded by the file and by qemu's limits.
    _check(h.l1_size <= MAX_L1_BYTES // L1E_SIZE,
           f"l1_size {h.l1_size} exceeds the limit of {MAX_L1_BYTES // L1E_SIZE} entries",
           "l1_size", "Active L1 table too large")
    # An L2 table maps half as much with extended (16-byte) entries.
    geo = Geometry(cb, h.refcount_order, extended_l2=h.incompatible_features & INCOMPAT_EXTL2)
    needed_l1 = geo.l1_size_for(h.size)
    _check(h.l1_size >= needed_l1,
           f"l1_size {h.l1_size} too small for a virtual size of {h.size} (needs {needed_l1}"
           f"{' with extended L2 entries' if geo.extended_l2 else ''})", "l1_size",
           "Image is too big" if needed_l1 > QEMU_MAX_L1_INDEX else "L1 table is too small")
    _check_table(h.l1_table_offset, h.l1_size * L1E_SIZE, cs, file_size, "l1_table_offset")
    _check(h.refcount_table_clusters or check,
           "refcount_table_clusters is 0: the image has no refcount table",
           "refcount_table_clusters", "Image does not contain a reference count table")
    _check(h.refcount_table_clusters <= MAX_REFTABLE_BYTES // cs,
           f"refcount_table_clusters {h.refcount_table_clusters} out of range",
           "refcount_table_clusters", "Reference count table too large")
    _check_table(h.refcount_table_offset, h.refcount_table_clusters * cs, cs, file_size,
                 "refcount_table_offset")
    _check(h.nb_snapshots <= MAX_SNAPSHOTS, f"nb_snapshots {h.nb_snapshots} exceeds {MAX_SNAPSHOTS}",
           "nb_snapshots", "Snapshot table too large")
    if h.nb_snapshots:
        _check_table(h.snapshots_offset, 40 * h.nb_snapshots, cs, file_size, "snapshots_offset")

    ext_end = cs
    if h.backing_file_offset:
        _check(h.backing_file_size <= MAX_BACKING_FILE_SIZE,
               f"backing_file_size {h.backing_file_size} exceeds {MAX_BACKING_FILE_SIZE}",
               "backing_file_size")
        _check(h.backing_file_offset + h.backing_file_size <= min(cs, len(buf)),
               f"backing file name at {h.backing_file_offset:#x} runs past the first cluster",
               "backing_file_offset")
        name = bytes(buf[h.backing_file_offset:h.backing_file_offset + h.backing_file_size])
        if b"\0" in name:
            raise CorruptImageError(f"backing file name has a NUL byte at position "
                                    f"{name.index(0)} of {len(name)}",
                                    offset=h.backing_file_offset, field="backing_file")
        try:
            h.backing_file = name.decode()
        except UnicodeDecodeError:
            raise CorruptImageError("backing file name is not valid UTF-8",
                                    offset=h.backing_file_offset, field="backing_file") from None
        ext_end = h.backing_file_offset
    _parse_extensions(h, buf, h.header_length, min(ext_end, len(buf)))
    return h


def _check_table(offset, length, cs, file_size, field):
    _check(offset % cs == 0, f"{offset:#x} is not aligned to the cluster size {cs}", field)
    _check(offset != 0 or length == 0, "table overlaps the image header", field)
    _check(offset + length <= file_size,
           f"table [{offset:#x}, {offset + length:#x}) runs past the end of the file "
           f"({file_size} bytes)", field)


def _parse_extensions(h, buf, start, end):
    pos = start
    seen = set()
    h.other_extensions = []
    while True:
        if pos + EXT_HEADER.size > end:
            if pos >= end:      # an area that ends without an end marker
                return
            raise CorruptImageError("header extension runs past the header area",
                                    offset=pos, field="header extension")
        kind, length = EXT_HEADER.unpack_from(buf, pos)
        if kind == EXT_END:
            return
        data_at = pos + EXT_HEADER.size
        if data_at + length > end:
            raise CorruptImageError(f"header extension {kind:#010x} of length {length} "
                                    "runs past the header area", offset=pos,
                                    field="header extension")
        data = bytes(buf[data_at:data_at + length])
        # (qemu reads extensions in order: a second backing format wins;
        # any other extension twice is refused)
        if kind in seen and kind != EXT_BACKING_FORMAT:
            raise CorruptImageError(f"header extension {kind:#010x} appears twice",
                                    offset=pos, field="header extension")
        seen.add(kind)
        if kind == EXT_BACKING_FORMAT:
            h.backing_format = data.decode(errors="replace")
        elif kind == EXT_FEATURE_TABLE:
            # as qemu: a last partial entry zero-padded, the table ends at an
            # entry without a name
            table = data + bytes(-length % FEATURE_ENTRY.size)
            for i in range(len(table) // FEATURE_ENTRY.size):
                t, bit, name = FEATURE_ENTRY.unpack_from(table, i * FEATURE_ENTRY.size)
                name = name.split(b"\0", 1)[0]
                if not name:
                    break
                h.feature_names[(t, bit)] = name.decode(errors="replace")
        else:
            h.other_extensions.append(HeaderExtension(kind, data))
        pos = data_at + length + (-length % 8)


def check_features(h, writable):
    """Raise UnsupportedFeatureError for features this version cannot handle."""
    unknown = h.incompatible_features & ~SUPPORTED_INCOMPAT
    if unknown:
        # qemu's report: the names the image's feature table gives, in its
        # order, then the bits it does not name
        names, rest = [], unknown
        for (kind, bit), name in h.feature_names.items():
            if kind == FEATURE_INCOMPAT and rest >> bit & 1:
                names.append(name)
                rest &= ~(1 << bit)
        if rest:
            names.append(f"Unknown incompatible feature: {rest:x}")
        names = ", ".join(names)
        raise UnsupportedFeatureError(f"Unsupported qcow2 feature(s): {names}", feature=names)
    if h.crypt_method > 2:      # 1 AES, 2 LUKS: engine/crypto.py
        raise UnsupportedFeatureError(f"Unsupported encryption method: {h.crypt_method}",
                                      feature="crypt_method")
    if h.incompatible_features & INCOMPAT_COMPRESSION:
        if h.compression_type == COMPRESSION_ZLIB:
            raise CorruptImageError("compression type bit set but compression_type is zlib",
                                    offset=COMPRESSION_TYPE_OFFSET, field="compression_type")
    elif h.compression_type != COMPRESSION_ZLIB:
        raise CorruptImageError(
            f"compression_type {h.compression_type} without the compression type bit",
            offset=COMPRESSION_TYPE_OFFSET, field="compression_type")
    if h.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedFeatureError(f"unknown compression_type {h.compression_type}",
                                      feature="compression type")
    if h.incompatible_features & INCOMPAT_EXTL2 and h.cluster_bits < MIN_EXTL2_CLUSTER_BITS:
        raise CorruptImageError(f"extended L2 entries with {1 << h.cluster_bits}-byte clusters: "
                                "subclusters would be smaller than 512 bytes",
                                offset=FIELD_OFFSET["cluster_bits"], field="cluster_bits")
