"""Internal snapshots: the snapshot table (qemu's qcow2-snapshot.c).

This version reads the table (to honour the clusters snapshots share with
the active layer and to account for them in refcounts) and finds a snapshot
to view read-only; creating, applying and deleting snapshots come later.
"""

import dataclasses
import struct

from ..errors import CorruptImageError, InvalidArgumentError
from ..spec.constants import L1E_SIZE
from ..spec.header import MAX_L1_BYTES

# Fixed part of a snapshot table entry.
SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")
SNAPSHOT_EXTRA = struct.Struct(">QQ")          # vm_state_size_large, disk_size


@dataclasses.dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int = None
    extra_data: bytes = b""


def read_snapshot_table(file, header, file_size):
    """Parse the snapshot table; returns (snapshots, table byte length)."""
    if header.nb_snapshots == 0:
        return [], 0
    cs = header.cluster_size
    off = header.snapshots_offset
    snapshots = []
    pos = off
    # A table entry is at most 40 + 64 KiB extra + 2 * 64 KiB strings; read
    # in chunks so a lying count cannot make us read unboundedly at once.
    for i in range(header.nb_snapshots):
        if pos + SNAPSHOT_ENTRY.size > file_size:
            raise CorruptImageError(f"snapshot table entry {i} runs past the end of the file",
                                    offset=pos, field="snapshots_offset")
        fixed = file.pread(pos, SNAPSHOT_ENTRY.size)
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmsize,
         extra_len) = SNAPSHOT_ENTRY.unpack(fixed)
        if extra_len > 1024:
            raise CorruptImageError(f"snapshot {i}: extra data size {extra_len} is too large",
                                    offset=pos + 36, field="extra_data_size")
        var_len = extra_len + id_len + name_len
        if pos + SNAPSHOT_ENTRY.size + var_len > file_size:
            raise CorruptImageError(f"snapshot table entry {i} runs past the end of the file",
                                    offset=pos, field="snapshots_offset")
        var = file.pread(pos + SNAPSHOT_ENTRY.size, var_len)
        extra = var[:extra_len]
        sid = var[extra_len:extra_len + id_len].decode(errors="replace")
        name = var[extra_len + id_len:].decode(errors="replace")
        disk_size = None
        if extra_len >= 8:
            vmsize = struct.unpack_from(">Q", extra, 0)[0]
        if extra_len >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if l1_off % cs:
            raise CorruptImageError(f"snapshot {sid!r}: L1 table offset {l1_off:#x} is not "
                                    "cluster-aligned", offset=pos, field="snapshot l1_table_offset")
        if l1_size > MAX_L1_BYTES // L1E_SIZE or l1_off + l1_size * L1E_SIZE > file_size:
            raise CorruptImageError(f"snapshot {sid!r}: L1 table ({l1_size} entries at "
                                    f"{l1_off:#x}) is invalid or past the end of the file",
                                    offset=pos, field="snapshot l1_size")
        snapshots.append(Snapshot(l1_off, l1_size, sid, name, dsec, dnsec, vmclock, vmsize,
                                  disk_size, bytes(extra)))
        entry_len = SNAPSHOT_ENTRY.size + var_len
        pos += entry_len + (-entry_len % 8)
    return snapshots, pos - off


def find_snapshot(snapshots, which):
    """The snapshot ``which`` names, as qemu's ``-l`` finds it.

    ``which`` is an id-or-name string (an id match wins, as in qemu) or a
    mapping with ``id`` and/or ``name`` keys that must all match."""
    if isinstance(which, str):
        for key in ("id", "name"):
            for s in snapshots:
                if getattr(s, key) == which:
                    return s
    else:
        want = {k: v for k, v in dict(which).items() if v is not None}
        if not want or set(want) - {"id", "name"}:
            raise InvalidArgumentError(f"a snapshot is named by 'id' and/or 'name', not {which!r}")
        for s in snapshots:
            if all(getattr(s, k) == v for k, v in want.items()):
                return s
    what = repr(which) if isinstance(which, str) else \
        ", ".join(f"{k}={v!r}" for k, v in sorted(want.items()))
    raise InvalidArgumentError(f"can't find snapshot {what}")
