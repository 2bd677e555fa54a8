"""Reading the bitmaps extension from an image file: the extension, the
bitmap directory and bitmap tables, what they reference, and qemu's view
of disowned bitmaps (the "Bitmap List" half of qemu's qcow2-bitmap.c).
Used by the open image (engine/bitmap.py) and by check, its repairs and
the refcount rebuild, which must count every cluster the bitmaps use."""

from .._numpy import np

from ..errors import CorruptImageError
from ..spec import bitmaps as bm
from ..spec import header as hdr

STALE_WARNING = ("a program lacking bitmap support modified this file, so all bitmaps are "
                 "now considered inconsistent")
STALE_WARNING_V2 = ("This qcow2 v2 image contains bitmaps, but they may have been modified by "
                    "a program without persistent bitmap support; so now they must all be "
                    "considered inconsistent")


def find_extension(h):
    """The bitmaps HeaderExtension of header ``h``, or None."""
    for e in h.other_extensions:
        if e.type == hdr.EXT_BITMAPS:
            return e
    return None


def read_extension(h):
    """(BitmapsExtension or None, stale): the extension when the autoclear
    bit says its bitmaps are valid; ``stale`` when one is there but the bit
    was cleared (the bitmaps are to be ignored)."""
    e = find_extension(h)
    if e is None:
        return None, False
    if not h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
        return None, True
    return bm.parse_extension(e.data, h.cluster_size), False


def read_directory(f, h, disk_size, *, strict=True):
    """[BitmapEntry] of the image in file ``f`` with header ``h`` (empty
    without a valid extension).  ``strict``: also refuse tables past the end
    of the file and duplicate names (what qemu finds when loading)."""
    ext, _ = read_extension(h)
    if ext is None:
        return []
    size = f.size()
    # past the end of the file reads as zeros (qemu's check reads it so)
    n = max(0, min(ext.directory_size, size - ext.directory_offset))
    raw = bytes(f.pread(ext.directory_offset, n)).ljust(ext.directory_size, b"\0")
    return bm.parse_directory(raw, ext, h.cluster_size, disk_size,
                              size if strict else None)


def read_table(f, entry, cluster_size):
    """The bitmap table of ``entry`` (native uint64), every entry checked."""
    raw = bytes(f.pread(entry.table_offset, entry.table_size * bm.TABLE_ENTRY_SIZE))
    table = bm.decode_table(raw.ljust(entry.table_size * bm.TABLE_ENTRY_SIZE, b"\0"))
    bad = np.flatnonzero(bm.bad_table_entries(table, cluster_size))
    if len(bad):
        i = int(bad[0])
        raise CorruptImageError(f"bitmap '{entry.name}': table entry {i} ({int(table[i]):#x}) "
                                "has reserved bits set or an unaligned offset",
                                offset=entry.table_offset + 8 * i, field="bitmap table entry")
    return table


def read_tables(f, entries, cluster_size):
    """The tables of ``entries`` at once (65535 bitmaps: one pread each,
    one numpy pass): (every entry's table concatenated, native uint64;
    where each starts, len(entries) + 1 offsets).  A bad entry raises as
    read_table does, for the first entry that has one; ``first_bad`` is
    returned instead of raising with ``strict=False``."""
    file_size = f.size()        # (a table past the file's end reads as zeros; one past
    raw = b"".join(             # 2^63, from a hostile directory, is not read at all)
        (bytes(f.pread(e.table_offset, e.table_size * bm.TABLE_ENTRY_SIZE))
         if e.table_offset < file_size else b"").ljust(e.table_size * bm.TABLE_ENTRY_SIZE, b"\0")
        for e in entries)
    tables = bm.decode_table(raw)
    starts = np.zeros(len(entries) + 1, dtype=np.int64)
    np.cumsum([e.table_size for e in entries], out=starts[1:])
    bad = np.flatnonzero(bm.bad_table_entries(tables, cluster_size))
    first_bad = int(np.searchsorted(starts, bad[0], side="right")) - 1 if len(bad) else None
    return tables, starts, first_bad


def table_error(f, entry, cluster_size):
    """The CorruptImageError read_table raises for ``entry``."""
    try:
        read_table(f, entry, cluster_size)
    except CorruptImageError as e:
        return e
    raise AssertionError(f"bitmap '{entry.name}': its table reads clean")


def check_loadable(f, h, disk_size):
    """Raise CorruptImageError where qemu's open fails on the bitmaps
    (bitmap_list_load, and load_bitmap of every consistent bitmap: its
    table's entries, a name used twice)."""
    entries = read_directory(f, h, disk_size, strict=False)
    loaded = [e for e in entries if not e.in_use]
    _, _, bad = read_tables(f, loaded, h.cluster_size)
    names = set()
    for e in entries:
        if e.name in names:
            raise CorruptImageError(f"Bitmap already exists: {e.name}", offset=e.entry_offset,
                                    field="name")
        names.add(e.name)
        if bad is not None and e is loaded[bad]:
            raise table_error(f, e, h.cluster_size)


def referenced_ranges(f, h, disk_size):
    """What the bitmaps extension references, as qemu's check counts it
    (qcow2_check_bitmaps_refcounts): ([(offset, nbytes, what)], corruptions).
    A directory that cannot be parsed counts its own clusters only; a bad
    table stops the count there, as in qemu."""
    ext, _ = read_extension(h)
    if ext is None:
        return [], 0
    cs = h.cluster_size
    out = [(ext.directory_offset, ext.directory_size, "the bitmap directory")]
    try:
        entries = read_directory(f, h, disk_size, strict=False)
    except CorruptImageError:
        return out, 1
    tables, starts, bad = read_tables(f, entries, cs)
    offs = bm.table_offsets(tables)
    for k, e in enumerate(entries):
        out.append((e.table_offset, e.table_size * bm.TABLE_ENTRY_SIZE,
                    f"the table of bitmap '{e.name}'"))
        if k == bad:
            return out, 1
        for i in np.flatnonzero(offs[starts[k]:starts[k + 1]]):
            out.append((int(offs[starts[k] + i]), cs, f"entry {int(i)} of the table of bitmap "
                                                      f"'{e.name}' (bitmap data)"))
    return out, 0


def stale_warning(h):
    """qemu's warning for an image whose bitmaps were disowned, or None."""
    if find_extension(h) is None or h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
        return None
    return ((STALE_WARNING_V2 if h.version < 3 else STALE_WARNING)
            + "\nSome clusters may be leaked, run 'qemu-img check -r' on the image file to fix.")


def drop_stale_extension(f, h):
    """Remove a disowned bitmaps extension from the header in file ``f``
    (what qemu's next open for writing does); True if there was one."""
    if stale_warning(h) is None:
        return False
    h.other_extensions = [e for e in h.other_extensions if e.type != hdr.EXT_BITMAPS]
    f.pwrite(h.pack(), 0)
    f.sync()
    return True


def read_extension_any(h):
    """The bitmaps extension as it is in the header, whatever the autoclear
    bit says (None if absent)."""
    e = find_extension(h)
    if e is None:
        return None, False
    return bm.parse_extension(e.data, h.cluster_size), False
