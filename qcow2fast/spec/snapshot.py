"""The snapshot table's on-disk layout (qcow2.txt "Snapshots"; qemu's
QCowSnapshotHeader and QCowSnapshotExtraData): parse and pack of one
entry, and the limits qemu puts on the table.  No I/O.

An entry is the fixed part (40 bytes), ``extra_data_size`` bytes of extra
data, the id string, the name; the next entry starts at a multiple of 8
bytes from the table's start.  The extra data this version knows are
``vm_state_size_large``, ``disk_size`` and ``icount`` (24 bytes, what
qemu 7.2 writes); anything past them is kept as it was read.
"""

from __future__ import annotations

import dataclasses
import struct

# The fixed part of an entry: l1_table_offset, l1_size, id_str_size,
# name_size, date_sec, date_nsec, vm_clock_nsec, vm_state_size,
# extra_data_size.
SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")
# The known extra data, in the order it is laid out.
EXTRA_FIELDS = (("vm_state_size_large", ">Q"), ("disk_size", ">Q"), ("icount", ">Q"))
EXTRA_SIZE = 24                     # what qemu 7.2 writes (all three fields)
EXTRA_SIZE_V3 = 16                  # the spec: every v3 entry has at least this much
ICOUNT_NONE = (1 << 64) - 1         # icount: "not recorded"

# qemu's limits (qcow2.h): QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOT_EXTRA_DATA,
# QCOW_MAX_SNAPSHOTS_SIZE (the whole table).
MAX_SNAPSHOTS = 65536
MAX_EXTRA_DATA = 1024
MAX_TABLE_BYTES = 1024 * MAX_SNAPSHOTS
MAX_STRING = 0xFFFF                 # id and name lengths are 16-bit


@dataclasses.dataclass
class Snapshot:
    """One snapshot table entry.  ``vm_state_size`` is the large one when
    the extra data has it; ``disk_size`` None when the entry does not record
    it (the image's size applies); ``icount`` None when not recorded."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None = None
    extra_data: bytes = b""             # as read (its known fields are the attributes)
    icount: int | None = None

    @property
    def extra_data_size(self):
        return len(self.extra_data)


def parse_entry(fixed, var):
    """A Snapshot from an entry's fixed part and its variable part (extra
    data, id, name: ``extra_data_size + id_str_size + name_size`` bytes)."""
    (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmsize,
     extra_len) = SNAPSHOT_ENTRY.unpack(fixed)
    extra = bytes(var[:extra_len])
    values = {}
    pos = 0
    for name, fmt in EXTRA_FIELDS:
        n = struct.calcsize(fmt)
        if extra_len < pos + n:
            break
        values[name] = struct.unpack_from(fmt, extra, pos)[0]
        pos += n
    icount = values.get("icount")
    return Snapshot(
        l1_off, l1_size, _c_string(var[extra_len:extra_len + id_len]),
        _c_string(var[extra_len + id_len:extra_len + id_len + name_len]),
        dsec, dnsec, vmclock, values.get("vm_state_size_large", vmsize), values.get("disk_size"),
        extra, None if icount in (None, ICOUNT_NONE) else icount)


def _c_string(raw):
    """An id or name as qemu holds it: a C string, so a NUL ends it (what
    follows is invisible to qemu and dropped when it rewrites the table)."""
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


def entry_lengths(fixed):
    """(extra_data_size, id_str_size, name_size) of an entry's fixed part."""
    _, _, id_len, name_len, _, _, _, _, extra_len = SNAPSHOT_ENTRY.unpack(fixed)
    return extra_len, id_len, name_len


def pack_entry(sn, disk_size):
    """An entry as qemu 7.2 writes it (qcow2_write_snapshots): at least the
    24 bytes of known extra data (unknown extra data read from the image
    kept after them), ``vm_state_size`` 0 in the fixed part when it does
    not fit 32 bits (older readers then see a disk-only snapshot), and
    ``disk_size`` defaulting to the image's size."""
    ident, name = sn.id.encode(), sn.name.encode()
    if len(ident) > MAX_STRING or len(name) > MAX_STRING:
        raise ValueError(f"snapshot id or name longer than {MAX_STRING} bytes")
    extra = struct.pack(">QQQ", sn.vm_state_size,
                        disk_size if sn.disk_size is None else sn.disk_size,
                        ICOUNT_NONE if sn.icount is None else sn.icount)
    extra += sn.extra_data[EXTRA_SIZE:]
    small = sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0
    fixed = SNAPSHOT_ENTRY.pack(sn.l1_table_offset, sn.l1_size, len(ident), len(name),
                                sn.date_sec, sn.date_nsec, sn.vm_clock_nsec, small, len(extra))
    return fixed + extra + ident + name


def pack_table(snapshots, disk_size):
    """The whole table: entries padded to 8-byte boundaries (the last one
    not padded, as qemu sizes it)."""
    out = bytearray()
    for sn in snapshots:
        out += bytes(-len(out) % 8)
        out += pack_entry(sn, disk_size)
    return bytes(out)
