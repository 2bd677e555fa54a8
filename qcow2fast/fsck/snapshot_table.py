"""check and check -r all on the snapshot table (qemu's
qcow2_check_read_snapshot_table and qcow2_check_fix_snapshot_table).

What qemu refuses to open but its check -r all mends is mended here the
same way, with qemu's messages: more than 65536 snapshots or a table past
qemu's size limit (the overhanging snapshots dropped: the header's count
is lowered first, which leaks their clusters, and the leak repair frees
them), too much extra data in an entry (cut to 1024 bytes), and v3
entries with less than 16 bytes of extra data (reported without -r too).
The table is then written anew, after the refcounts are repaired (it
needs cluster allocation)."""

import os

from ..engine.snapshot import TableRepairs, read_snapshot_table, too_many
from ..spec import header as hdr
from ..spec.snapshot import MAX_SNAPSHOTS


def clamp_count(buf, fix, repairs):
    """The header bytes to parse: with ``fix``, a snapshot count over
    qemu's limit is lowered to it (noted in ``repairs``)."""
    at = hdr.FIELD_OFFSET["nb_snapshots"]
    nb = hdr.FIELD_STRUCT["nb_snapshots"].unpack_from(buf, at)[0] if len(buf) >= at + 4 else 0
    if nb <= MAX_SNAPSHOTS:
        return buf
    if not fix:
        raise too_many(nb)
    repairs.messages.append(f"Discarding {nb - MAX_SNAPSHOTS} overhanging snapshots")
    repairs.reduced += nb - MAX_SNAPSHOTS
    return bytes(buf[:at]) + hdr.FIELD_STRUCT["nb_snapshots"].pack(MAX_SNAPSHOTS) + \
        bytes(buf[at + 4:])


def read_for_check(f, h, repairs):
    """The table as check sees it; the header's count follows what is kept."""
    snapshots, nbytes = read_snapshot_table(f, h, repairs)
    h.nb_snapshots = len(snapshots)
    return snapshots, nbytes


def account(res, repairs):
    """qemu's counts: the table's problems come first among the messages;
    fixed ones count as fixed corruptions."""
    from .bounds import MAX_MESSAGES
    lines = repairs.messages + res.messages
    res.messages_dropped += max(0, len(lines) - MAX_MESSAGES)
    res.messages = lines[:MAX_MESSAGES]
    n = repairs.reduced + repairs.extra_dropped + repairs.incomplete
    if repairs.fix:
        res.corruptions_fixed += n
    else:
        res.corruptions += n
    res.snapshot_repairs = repairs if repairs.fix and n else None


def fix_count(path, repairs):
    """Lower the header's snapshot count to what was kept (before the
    refcount repair, which then frees the dropped snapshots' clusters)."""
    if not repairs.reduced:
        return
    from ..host.file import open_in_place
    f = open_in_place(path)
    try:
        size = f.size()
        h = hdr.parse_header(clamp_count(f.pread(0, min(size, 2 << 20)), True, TableRepairs(True)),
                             size, check=True)
        kept, _ = read_snapshot_table(f, h, TableRepairs(True))
        at, data = hdr.pack_fields(nb_snapshots=len(kept))
        f.pwrite(data, at)
        f.sync()
    finally:
        f.close()


def rewrite(path):
    """Write the mended table anew (qemu_check_fix_snapshot_table)."""
    from ..engine.image import Image
    # locking=False: check -r holds the image's locks for the whole command.
    img = Image(os.fspath(path), "r+", cache_clean_interval=0, backing=False, locking=False,
                _repair=True)
    try:
        img._update(img._snapshot_ops().rewrite_table)
    finally:
        img.close()
