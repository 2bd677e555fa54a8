"""The L1 and L2 tables a refcount rebuild walks, each read once.

A hostile image can name one huge L1 table from every one of 65536
snapshots, and one L2 table from every entry of a 32 MiB L1 table: walked
entry by entry (as qemu's rebuild does) that is terabytes of reads.  The
refcount a table's clusters should have is the number of references to
the table, so each distinct L1 table (offset, size) is read once and
weighted by how many snapshots name it, and each distinct L2 table once,
weighted by how many L1 entries reach it.  L1 tables read total at most
the file's size (more can only be tables overlapping one another), as in
check (fsck/check.py).  Work and memory are then bounded by the file, for
the rebuild of a dirty image at open and for ``check -r all`` alike.
"""

import numpy as np

from ..errors import CorruptImageError
from ..engine.mapping import read_l1_table
from ..spec.constants import L1E_SIZE
from ..spec.entries import l2_table_offsets


def l1_tables(img):
    """[(what, offset, entries, weight)]: the active L1 table, and each
    distinct snapshot L1 table once with the number of snapshots naming
    it; refuses L1 tables totalling more entries than the file holds."""
    f, h = img.file, img.header
    cs, file_size = img.geo.cluster_size, f.size()
    out = [("active L1", h.l1_table_offset, np.asarray(img.mapping.l1), 1)]
    budget = file_size // L1E_SIZE - len(img.mapping.l1)
    seen = {}
    for sn in img.snapshots:
        key = (sn.l1_table_offset, sn.l1_size)
        if key in seen:
            seen[key][3] += 1
            continue
        budget -= sn.l1_size
        if budget < 0:
            raise CorruptImageError(f"snapshot {sn.id} L1 table at {sn.l1_table_offset:#x} "
                                    f"({sn.l1_size} entries): the L1 tables add up to more "
                                    "than the file holds (they overlap)",
                                    offset=sn.l1_table_offset, field="snapshot l1_size")
        seen[key] = [f"snapshot {sn.id} L1", sn.l1_table_offset,
                     np.asarray(read_l1_table(f, sn.l1_table_offset, sn.l1_size, cs, file_size,
                                              what=f"snapshot {sn.id} L1 table")), 1]
    return out + [tuple(v) for v in seen.values()]


def l2_tables(tables):
    """(offsets, weights): each distinct L2 table the L1 ``tables`` (from
    l1_tables) reach, and how many L1 entries reach it in all (uint64)."""
    offs, weights = [], []
    for _, _, l1, weight in tables:
        o = l2_table_offsets(l1)
        o = o[o != 0]
        if len(o):
            u, n = np.unique(o, return_counts=True)
            offs.append(u)
            weights.append(n.astype(np.uint64) * np.uint64(weight))
    if not offs:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    u, inv = np.unique(np.concatenate(offs), return_inverse=True)
    w = np.zeros(len(u), np.uint64)
    np.add.at(w, inv, np.concatenate(weights))
    return u, w
