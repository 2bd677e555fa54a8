"""Internal snapshots: the snapshot table (qemu's qcow2-snapshot.c:
qcow2_read_snapshots, qcow2_write_snapshots, the id and name lookups).

This module reads and writes the table; creating, applying and deleting
a snapshot (the L1 tables and refcounts) is engine/snapshot_ops.py.

Invariant of the writer: the table is never changed in place.  A new
table is written to newly allocated clusters, made stable, and only then
does the header point to it (nb_snapshots and snapshots_offset in one
write, inside the header's first sector); the old table is freed after
that.  A crash leaves the old or the new table, and at worst leaks the
other one.
"""

import errno
import os
import warnings

from ..errors import CorruptImageError, InvalidArgumentError, LeakWarning, SnapshotNotFoundError
from ..spec.constants import L1E_SIZE
from ..spec.header import MAX_L1_BYTES, pack_fields
from . import features
from ..spec.snapshot import (EXTRA_SIZE_V3, MAX_EXTRA_DATA, MAX_SNAPSHOTS,
                             MAX_TABLE_BYTES, SNAPSHOT_ENTRY, Snapshot, entry_lengths, pack_table,
                             parse_entry)

__all__ = ["Snapshot", "read_snapshot_table", "find_snapshot", "new_snapshot_id",
           "write_snapshot_table", "TableRepairs", "SnapshotTableError"]


class SnapshotTableError(CorruptImageError):
    """A snapshot table qemu refuses to open and its check -r all mends;
    ``check_lines``: what qemu's check (without -r) says about it."""

    def __init__(self, message, check_lines, **kw):
        super().__init__(message, **kw)
        self.check_lines = check_lines


class TableRepairs:
    """What reading a snapshot table for ``check -r all`` found and
    mended the way qemu's qcow2_check_read_snapshot_table does: the
    messages (qemu's), snapshots dropped off the end, extra data cut, v3
    entries whose extra data is incomplete.  ``fix``: repair (else only
    report what qemu reports without -r)."""

    def __init__(self, fix):
        self.fix = fix
        self.messages = []
        self.reduced = 0            # snapshots dropped off the end
        self.extra_dropped = 0      # entries whose extra data was cut to the limit
        self.incomplete = 0         # v3 entries with less than 16 bytes of extra data

    @property
    def rewrite(self):
        """The table must be written anew (qemu's qcow2_check_fix_snapshot_table):
        dropping snapshots off the end only lowers the header's count (the
        table stays where it is, its tail leaked); cut extra data and
        incomplete entries need new entries."""
        return self.fix and (self.extra_dropped or self.incomplete)


def read_snapshot_table(file, header, repairs=None):
    """Parse the snapshot table; returns (snapshots, table byte length).

    Without ``repairs`` a table qemu refuses to open is an error.  With a
    :class:`TableRepairs` whose ``fix`` is set, what qemu's check -r all
    mends is mended in memory (too many snapshots or a table too long:
    the overhanging ones dropped; too much extra data: cut to the limit)
    and noted there; the caller writes the header count and the table."""
    nb = header.nb_snapshots
    if nb == 0:
        return [], 0
    if nb > MAX_SNAPSHOTS:
        if repairs is None or not repairs.fix:
            raise too_many(nb)
        repairs.messages.append(f"Discarding {nb - MAX_SNAPSHOTS} overhanging snapshots")
        repairs.reduced += nb - MAX_SNAPSHOTS
        nb = MAX_SNAPSHOTS
    off = header.snapshots_offset
    snapshots = []
    pos, length = off, 0
    for i in range(nb):
        # Entries are read one at a time, each bounded (40 bytes + 1 KiB of
        # extra data + two 64 KiB strings), so a lying count or size cannot
        # make us read unboundedly at once.
        # Past the end of the file reads as zeros, as in qemu (whose file
        # driver zero-fills such reads); the table stays bounded by
        # MAX_TABLE_BYTES below.
        start = pos
        fixed = file.pread(pos, SNAPSHOT_ENTRY.size)
        extra_len, id_len, name_len = entry_lengths(fixed)
        keep_extra = extra_len
        if extra_len > MAX_EXTRA_DATA:
            if repairs is None or not repairs.fix:
                raise SnapshotTableError(
                    f"Too much extra metadata in snapshot table entry {i} ({extra_len} > "
                    f"{MAX_EXTRA_DATA}); qemu-img check -r all can remove it",
                    ["ERROR failed to read the snapshot table: Too much extra metadata in "
                     f"snapshot table entry {i}",
                     "You can force-remove this extra metadata with qemu-img check -r all"],
                    offset=pos + 36, field="extra_data_size",
                    qemu=f"Too much extra metadata in snapshot table entry {i}\nYou can "
                         "force-remove this extra metadata with qemu-img check -r all")
            repairs.messages.append(f"Discarding too much extra metadata in snapshot table "
                                    f"entry {i} ({extra_len} > {MAX_EXTRA_DATA})")
            repairs.extra_dropped += 1
            keep_extra = MAX_EXTRA_DATA
        var_len = extra_len + id_len + name_len
        body = pos + SNAPSHOT_ENTRY.size
        var = file.pread(body, keep_extra) + file.pread(body + extra_len, id_len + name_len)
        fixed = fixed[:36] + keep_extra.to_bytes(4, "big")
        sn = parse_entry(fixed, var)
        length += -length % 8 + SNAPSHOT_ENTRY.size + keep_extra + id_len + name_len
        if length > MAX_TABLE_BYTES:
            if repairs is None or not repairs.fix:
                raise SnapshotTableError(
                    f"snapshot table is too big (more than {MAX_TABLE_BYTES} bytes); qemu-img "
                    f"check -r all can remove the {nb - i} overhanging snapshots",
                    ["ERROR failed to read the snapshot table: Snapshot table is too big",
                     f"You can force-remove all {nb - i} overhanging snapshots with qemu-img "
                     "check -r all"], offset=off, field="snapshots_offset",
                    qemu=f"Snapshot table is too big\nYou can force-remove all {nb - i} "
                         "overhanging snapshots with qemu-img check -r all")
            repairs.messages.append(f"Discarding {nb - i} overhanging snapshots (snapshot "
                                    "table is too big)")
            repairs.reduced += nb - i
            pos = start
            break
        if repairs is not None and header.version >= 3 and keep_extra < EXTRA_SIZE_V3:
            repairs.messages.append(f"{'Repairing' if repairs.fix else 'ERROR'} snapshot table "
                                    f"entry {i} is incomplete")
            repairs.incomplete += 1
        snapshots.append(sn)
        pos = body + var_len
        if i + 1 < nb:
            pos += -(pos - off) % 8
    return snapshots, pos - off


def too_many(nb):
    return SnapshotTableError(
        f"nb_snapshots {nb} exceeds {MAX_SNAPSHOTS}; qemu-img check -r all can remove the "
        f"{nb - MAX_SNAPSHOTS} overhanging snapshots",
        ["ERROR snapshot table too large",
         f"You can force-remove all {nb - MAX_SNAPSHOTS} overhanging snapshots with qemu-img "
         "check -r all"], field="nb_snapshots", qemu="Snapshot table too large")


def check_l1_fields(sn, cs):
    """Refuse to use snapshot ``sn`` whose L1 table is unaligned or too
    large (qemu's qcow2_validate_table: "Snapshot L1 table offset invalid",
    "Snapshot L1 table too large", -EINVAL: nothing written, the image not
    marked corrupt).  Checked where the table is used, not at open: qemu
    opens such an image (read-write too).  A table past the end of the file
    is not refused: qemu reads it as zeros (see :func:`snapshot_l1`)."""
    if sn.l1_table_offset % cs:
        raise InvalidArgumentError(f"Snapshot L1 table offset invalid: snapshot {sn.id} "
                                   f"({sn.name}): l1_table_offset {sn.l1_table_offset:#x} is "
                                   "not cluster-aligned")
    if sn.l1_size > MAX_L1_BYTES // L1E_SIZE:
        raise InvalidArgumentError(f"Snapshot L1 table too large: snapshot {sn.id} ({sn.name}): "
                                   f"{sn.l1_size} entries")


def snapshot_l1(f, sn, cs, file_size):
    """Snapshot ``sn``'s L1 table (native uint64), checked as qemu checks it
    when it loads, applies or deletes the snapshot: the part past the end of
    the file reads as zeros (no L2 tables there), as in qemu, whose file
    driver pads reads past the end."""
    from .mapping import read_l1_table      # (numpy: this module stays light for the CLI)
    check_l1_fields(sn, cs)
    return read_l1_table(f, sn.l1_table_offset, sn.l1_size, cs, file_size,
                         what=f"snapshot {sn.id} L1 table", past_eof_zeros=True)


def l1_inside_file(sn, file_size):
    """Whether the clusters of ``sn``'s L1 table lie inside the file."""
    return sn.l1_table_offset + sn.l1_size * L1E_SIZE <= file_size


def find_snapshot(snapshots, which):
    """The snapshot ``which`` names, as qemu's ``-l`` finds it.

    ``which`` is an id-or-name string (an id match wins, as in qemu) or a
    mapping with ``id`` and/or ``name`` keys that must all match."""
    return snapshots[find_index(snapshots, which)]


def find_index(snapshots, which):
    """The index of the snapshot ``which`` names (see find_snapshot)."""
    if isinstance(which, str):
        for key in ("id", "name"):
            for i, s in enumerate(snapshots):
                if getattr(s, key) == which:
                    return i
    else:
        want = {k: v for k, v in dict(which).items() if v is not None}
        if not want or set(want) - {"id", "name"}:
            raise InvalidArgumentError(f"a snapshot is named by 'id' and/or 'name', not {which!r}")
        for i, s in enumerate(snapshots):
            if all(getattr(s, k) == v for k, v in want.items()):
                return i
    what = repr(which) if isinstance(which, str) else \
        ", ".join(f"{k}={v!r}" for k, v in sorted(want.items()))
    raise SnapshotNotFoundError(f"can't find snapshot {what}")


def new_snapshot_id(snapshots):
    """qemu's find_new_snapshot_id: one more than the largest id read as a
    number (strtoul: the leading digits, 0 if none)."""
    top = 0
    for s in snapshots:
        digits = ""
        for ch in s.id.lstrip():
            if not ch.isdigit() or not ch.isascii():
                break
            digits += ch
        top = max(top, int(digits) if digits else 0)
    return str(top + 1)


def write_snapshot_table(state, refcounts, snapshots, old_offset, old_bytes, dirty=None):
    """Write ``snapshots`` as the image's snapshot table, qemu's
    qcow2_write_snapshots order; returns (offset, byte length) of the new
    table.  The caller holds the exclusive lock and has made stable
    everything the new entries point to (their L1 tables, refcounts).
    ``dirty`` (True/False, v3): the dirty bit set or cleared by the same
    header write that switches the table (incompatible_features follows
    snapshots_offset in the header's first sector), saving the caller a
    header write and a barrier of its own."""
    geo, h = state.geo, state.header
    data = pack_table(snapshots, state.size)
    if len(data) > MAX_TABLE_BYTES:
        raise InvalidArgumentError(f"the snapshot table would exceed qemu's limit of "
                                   f"{MAX_TABLE_BYTES} bytes")
    offset = 0
    if data:
        n = geo.size_to_clusters(len(data))
        offset = refcounts.alloc(n)
        state.grow_host_limit(refcounts.end_cluster << geo.cluster_bits)
        state.allocated(offset + n * geo.cluster_size)
        state.file.pwrite(data + bytes(n * geo.cluster_size - len(data)), offset)
        state.metadata.add(offset >> geo.cluster_bits, n)
    state.refcount_cache.flush()
    # Barrier: the new table and its refcounts are stable before the
    # header points to it.
    state.barrier()
    fields = {"nb_snapshots": len(snapshots), "snapshots_offset": offset}
    if dirty is not None and h.version >= 3:
        fields["incompatible_features"] = features.with_dirty(h.incompatible_features, dirty)
    where, raw = pack_fields(**fields)
    state.file.pwrite(raw, where)
    # Barrier: the header names the new table (and the dirty bit is as
    # asked) before the old table is freed or anything relies on the bit.
    state.barrier()
    h.nb_snapshots, h.snapshots_offset = len(snapshots), offset
    if "incompatible_features" in fields:
        h.incompatible_features = fields["incompatible_features"]
        features.update_alloc_fast(state)
    if old_bytes:
        n_old = geo.size_to_clusters(old_bytes)
        state.metadata.remove(old_offset >> geo.cluster_bits, n_old)
        try:
            refcounts.free(old_offset, n_old)
            state.refcount_cache.flush()    # (written now, as qemu's free: no barrier needed)
        except OSError as e:        # the new table is in place: the old one leaks, as in qemu
            warnings.warn(LeakWarning(
                f"the old snapshot table at {old_offset:#x} could not be freed ({e}): its "
                f"{n_old} clusters are leaked", "qcow2_free_clusters failed: " +
                os.strerror(e.errno or errno.EIO)), stacklevel=3)
    return offset, len(data)
