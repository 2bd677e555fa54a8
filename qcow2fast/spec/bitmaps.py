"""The bitmaps extension: its header extension, the bitmap directory and
bitmap tables (qcow2.txt "Bitmaps extension", qemu's qcow2-bitmap.c).

Layouts and limits are declared here once and used to parse and to pack.
Parsing validates every field with qemu's rules and raises
:class:`CorruptImageError` naming the bitmap, the field and its offset.

Bitmap data: bit ``i % 8`` (least significant first) of byte ``i // 8``
of the data is granule ``i`` (``granularity`` guest bytes); a data cluster
holds ``8 * cluster_size`` granules.  A bitmap table entry points at one
data cluster, or is 0 (all zeros) or 1 (all ones).
"""

import dataclasses
import struct

from .._numpy import np

from ..errors import CorruptImageError, InvalidArgumentError

# The header extension: nb_bitmaps, reserved32, bitmap_directory_size,
# bitmap_directory_offset.
BITMAPS_EXT = struct.Struct(">IIQQ")
# A directory entry's fixed part: bitmap_table_offset, bitmap_table_size,
# flags, type, granularity_bits, name_size, extra_data_size; then the
# extra data, the name, and padding to a multiple of 8.
DIR_ENTRY = struct.Struct(">QIIBBHI")
DIR_ENTRY_FIELD_OFFSET = {"bitmap_table_offset": 0, "bitmap_table_size": 8, "flags": 12,
                          "type": 16, "granularity_bits": 17, "name_size": 18,
                          "extra_data_size": 20}
TABLE_ENTRY_SIZE = 8

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
# qemu treats every other bit (extra_data_compatible included) as reserved.
BME_RESERVED_FLAGS = 0xFFFFFFFC
FLAG_NAMES = ((BME_FLAG_IN_USE, "in-use"), (BME_FLAG_AUTO, "auto"))
BT_DIRTY_TRACKING_BITMAP = 1

BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1

# qemu's limits (qcow2.h, qcow2-bitmap.c), kept so no lying field can make
# us allocate without bound.
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_TABLE_SIZE = 0x8000000              # entries
MAX_PHYS_SIZE = 0x20000000              # bytes of bitmap data (RAM it takes)
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
MAX_NAME_SIZE = 1023


@dataclasses.dataclass
class BitmapsExtension:
    nb_bitmaps: int = 0
    directory_size: int = 0
    directory_offset: int = 0

    def pack(self):
        return BITMAPS_EXT.pack(self.nb_bitmaps, 0, self.directory_size, self.directory_offset)


@dataclasses.dataclass
class BitmapEntry:
    """One bitmap directory entry."""
    name: str
    granularity_bits: int
    flags: int = 0
    table_offset: int = 0
    table_size: int = 0
    entry_offset: int = 0           # where in the file its entry was read

    @property
    def granularity(self):
        return 1 << self.granularity_bits

    @property
    def in_use(self):
        return bool(self.flags & BME_FLAG_IN_USE)

    @property
    def auto(self):
        return bool(self.flags & BME_FLAG_AUTO)

    def flag_names(self):
        return [n for bit, n in FLAG_NAMES if self.flags & bit]

    def pack(self):
        name = self.name.encode()
        raw = DIR_ENTRY.pack(self.table_offset, self.table_size, self.flags,
                             BT_DIRTY_TRACKING_BITMAP, self.granularity_bits, len(name), 0) + name
        return raw + b"\0" * (-len(raw) % 8)


def entry_size(name_size, extra_data_size=0):
    """A directory entry's size, padded to 8 bytes."""
    n = DIR_ENTRY.size + name_size + extra_data_size
    return n + (-n % 8)


def data_bytes(disk_size, granularity_bits):
    """Bytes of bitmap data for a disk of ``disk_size`` bytes."""
    bits = -(-disk_size >> granularity_bits)
    return -(-bits // 8)


def table_size_for(disk_size, granularity_bits, cluster_size):
    """Bitmap table entries (data clusters) for a disk of ``disk_size``."""
    return -(-data_bytes(disk_size, granularity_bits) // cluster_size)


def stored_size(bitmaps, disk_size, cluster_size):
    """Bytes ``bitmaps`` [(name, granularity_bits)] take in an image of
    ``cluster_size`` clusters, every data cluster allocated (qemu's
    qcow2_get_persistent_dirty_bitmap_size, what measure reports)."""
    total = dir_size = 0
    for name, gbits in bitmaps:
        clusters = -(-data_bytes(disk_size, gbits) // cluster_size)
        total += clusters * cluster_size
        total += -(-clusters * TABLE_ENTRY_SIZE // cluster_size) * cluster_size
        dir_size += entry_size(len(name.encode()))
    return total + -(-dir_size // cluster_size) * cluster_size


def check_granularity(granularity):
    """qemu's block-dirty-bitmap-add check (a 32-bit granularity)."""
    if not isinstance(granularity, int) or granularity < 512 \
            or granularity & (granularity - 1) or granularity >= 1 << 32:
        raise InvalidArgumentError("Granularity must be power of 2 and at least 512")


def check_new_bitmap(name, granularity, disk_size, cluster_size):
    """qemu's check_constraints_on_bitmap for a bitmap about to be stored:
    raises InvalidArgumentError with qemu's message."""
    bits = granularity.bit_length() - 1
    if bits > MAX_GRANULARITY_BITS:
        raise InvalidArgumentError(
            f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)")
    if bits < MIN_GRANULARITY_BITS:
        raise InvalidArgumentError(
            f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)")
    nbytes = data_bytes(disk_size, bits)
    if nbytes > MAX_PHYS_SIZE or nbytes > MAX_TABLE_SIZE * cluster_size:
        raise InvalidArgumentError("Too much space will be occupied by the bitmap. "
                                   "Use larger granularity")
    if len(name.encode()) > MAX_NAME_SIZE:
        raise InvalidArgumentError(f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)")


def parse_extension(data, cluster_size, where=None):
    """The bitmaps header extension's payload -> BitmapsExtension (qemu's
    checks and messages)."""
    def bad(msg, field):
        raise CorruptImageError(msg, offset=where, field=field)
    if len(data) != BITMAPS_EXT.size:
        bad("bitmaps_ext: Invalid extension length", "bitmaps extension")
    nb, reserved, size, offset = BITMAPS_EXT.unpack(data)
    if reserved:
        bad("bitmaps_ext: Reserved field is not zero", "reserved32")
    if nb > MAX_BITMAPS:
        bad(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum "
            f"of {MAX_BITMAPS}", "nb_bitmaps")
    if nb == 0:
        bad("found bitmaps extension with zero bitmaps", "nb_bitmaps")
    # (cluster aligned, and a host offset: its top byte clear, as in a
    # table entry; qemu cannot read a directory past 2^63 either)
    if offset % cluster_size or offset & ~BME_TABLE_ENTRY_OFFSET_MASK:
        bad("bitmaps_ext: invalid bitmap directory offset", "bitmap_directory_offset")
    if size > MAX_DIRECTORY_SIZE:
        bad(f"bitmaps_ext: bitmap directory size ({size}) exceeds the maximum supported "
            f"size ({MAX_DIRECTORY_SIZE})", "bitmap_directory_size")
    return BitmapsExtension(nb, size, offset)


def parse_directory(buf, ext, cluster_size, disk_size, file_size=None):
    """The bitmap directory (``buf``, ``ext.directory_size`` bytes read at
    ``ext.directory_offset``) -> [BitmapEntry], with qemu's rules
    (bitmap_list_load, check_dir_entry).  Given ``file_size`` (strict, as
    when loading), a table past the end of the file or a directory past it,
    and a name used twice, are refused too."""
    base = ext.directory_offset
    if not ext.directory_size:
        raise CorruptImageError("Requested bitmap directory size is zero", offset=base,
                                field="bitmap_directory_size")
    if file_size is not None and base + ext.directory_size > file_size:
        raise CorruptImageError(
            f"bitmap directory [{base:#x}, {base + ext.directory_size:#x}) runs past the end "
            f"of the file ({file_size} bytes)", offset=base, field="bitmap_directory_offset")
    entries, pos, end = [], 0, len(buf)
    names = set()
    while pos < end:
        if pos + DIR_ENTRY.size > end:
            raise CorruptImageError(f"Broken bitmap directory: entry {len(entries)} runs past "
                                    "its end",
                                    offset=base + pos, field="bitmap directory")
        if len(entries) >= ext.nb_bitmaps:
            raise CorruptImageError("More bitmaps found than specified in header extension",
                                    offset=base + pos, field="nb_bitmaps")
        (t_off, t_size, flags, typ, gbits, name_size,
         extra) = DIR_ENTRY.unpack_from(buf, pos)
        size = entry_size(name_size, extra)
        if pos + size > end:
            raise CorruptImageError(f"Broken bitmap directory: entry {len(entries)} "
                                    f"('{name_guess(buf, pos, name_size, end)}') runs past its end",
                                    offset=base + pos, field="bitmap directory")
        raw_name = bytes(buf[pos + DIR_ENTRY.size + extra:pos + DIR_ENTRY.size + extra + name_size])
        name = raw_name.decode(errors="replace")
        e = BitmapEntry(name, gbits, flags, t_off, t_size, base + pos)

        def bad(why, field, name=name, at=base + pos):
            raise CorruptImageError(f"Bitmap '{name}' doesn't satisfy the constraints: {why}",
                                    offset=at + DIR_ENTRY_FIELD_OFFSET.get(field, 0),
                                    field=field,
                                    qemu=f"Bitmap '{name}' doesn't satisfy the constraints")
        if extra:
            bad("Bitmap extra data is not supported", "extra_data_size")
        if name_size > MAX_NAME_SIZE:
            bad(f"name_size {name_size} exceeds {MAX_NAME_SIZE}", "name_size")
        if typ != BT_DIRTY_TRACKING_BITMAP:
            bad(f"type {typ} is not a dirty tracking bitmap (1)", "type")
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            bad(f"granularity_bits {gbits} out of range [{MIN_GRANULARITY_BITS}, "
                f"{MAX_GRANULARITY_BITS}]", "granularity_bits")
        if flags & BME_RESERVED_FLAGS:
            bad(f"reserved flags set ({flags:#x})", "flags")
        if not t_size or not t_off or t_off % cluster_size:
            bad(f"bitmap table at {t_off:#x} of {t_size} entries is not a valid table",
                "bitmap_table_offset")
        if t_size > MAX_TABLE_SIZE or t_size * cluster_size > MAX_PHYS_SIZE:
            bad(f"bitmap_table_size {t_size} exceeds the limit", "bitmap_table_size")
        if not flags & BME_FLAG_IN_USE and \
                disk_size > (t_size * cluster_size * 8) << gbits:
            bad(f"bitmap_table_size {t_size} too small for a disk of {disk_size} bytes",
                "bitmap_table_size")
        if file_size is not None and t_off + t_size * TABLE_ENTRY_SIZE > file_size:
            bad(f"bitmap table [{t_off:#x}, {t_off + t_size * TABLE_ENTRY_SIZE:#x}) runs past "
                f"the end of the file ({file_size} bytes)", "bitmap_table_offset")
        if file_size is not None and name in names:
            bad("a bitmap of this name appears twice", "name")
        names.add(name)
        entries.append(e)
        pos += size
    if len(entries) != ext.nb_bitmaps:
        raise CorruptImageError("Less bitmaps found than specified in header extension",
                                offset=base, field="nb_bitmaps")
    return entries


def name_guess(buf, pos, name_size, end):
    """The name of an entry whose extra data may be a lie (its bytes right
    after the fixed part), for messages."""
    at = pos + DIR_ENTRY.size
    return bytes(buf[at:min(at + name_size, end)]).decode(errors="replace")


def pack_directory(entries):
    out = b"".join(e.pack() for e in entries)
    if len(out) > MAX_DIRECTORY_SIZE:
        raise InvalidArgumentError("Bitmap directory is too large")
    return out


def decode_table(raw):
    """Bitmap table bytes -> native uint64 entries."""
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def bad_table_entries(table, cluster_size):
    """Mask of entries breaking the spec (qemu's check_table_entry)."""
    offs = table & np.uint64(BME_TABLE_ENTRY_OFFSET_MASK)
    return ((table & np.uint64(BME_TABLE_ENTRY_RESERVED_MASK)) != 0) \
        | ((offs != 0) & ((table & np.uint64(BME_TABLE_ENTRY_FLAG_ALL_ONES)) != 0)) \
        | ((offs % np.uint64(cluster_size)) != 0)


def table_offsets(table):
    return table & np.uint64(BME_TABLE_ENTRY_OFFSET_MASK)
