"""What ``check`` reads and keeps of a hostile image, bounded
(:mod:`qcow2fast.fsck.check`): lines kept, L2 tables read at a time, L1
entries read in all, and how often one L2 table is counted.  A hostile
image (millions of bad entries, 4 Mi L1 entries naming one L2 table, L1
tables overlapping each other) then costs time and memory in proportion
to its file, and every verdict stays the one qemu gives.
"""

import numpy as np

from ..spec.constants import L1E_SIZE
from .references import repeat_ranks

# Leaks and corruptions explained in detail (the rest are only counted).
MAX_EXPLAINED = 10000
# Lines kept (qemu prints one per bad entry: millions for a hostile image).
MAX_MESSAGES = 100000
# L2 tables read and checked together.
L2_BATCH_BYTES = 16 << 20
# An L2 table is legitimately referenced once per L1 table (the active one
# and each snapshot's).  Counting a table again past that (and this margin)
# changes no verdict -- its refcount is wrong either way -- but a hostile
# image pointing 4 Mi L1 entries at one table would make check read and
# count 32 Gi entries: each table is counted at most that often.
EXTRA_L2_VISITS = 64


class Bounds:
    """The read bounds of one check of a file of ``file_size`` bytes with
    ``nb_snapshots`` snapshots."""

    def __init__(self, file_size, nb_snapshots, cluster_bits):
        self.max_l2_visits = nb_snapshots + 1 + EXTRA_L2_VISITS
        # L1 entries read in all: the L1 tables (each its own clusters) fit in the file.
        self.l1_budget = file_size // L1E_SIZE
        self.cluster_bits = cluster_bits

    def take_l1(self, n):
        """Whether an L1 table of ``n`` entries may still be read (it is then
        counted against the budget)."""
        if n > self.l1_budget:
            return False
        self.l1_budget -= n
        return True

    def over_visits(self, counts, l2offs, cand):
        """The entries among ``cand`` (a mask over ``l2offs``) whose table was
        already counted (``counts``: the tally by cluster) ``max_l2_visits``
        times, counting the earlier entries of this L1 table."""
        idx = np.nonzero(cand)[0]
        over = np.zeros(len(l2offs), dtype=bool)
        if not len(idx):
            return over
        offs = l2offs[idx]
        order, rank = repeat_ranks(offs)
        seen = counts[(offs[order] >> np.uint64(self.cluster_bits)).astype(np.int64)]
        over[idx[order[seen.astype(np.int64) + rank >= self.max_l2_visits]]] = True
        return over


def read_l2_tables(f, cs, offsets, out=None):
    """The L2 tables of ``cs`` bytes at ``offsets`` in the file ``f`` as the
    rows of a big-endian (on-disk) uint64 array (zeros past the end of the
    file), in ``out`` when given."""
    if out is None:
        out = np.empty((len(offsets), cs // 8), dtype=">u8")
    tables = out[:len(offsets)]
    mv = memoryview(tables.view(np.uint8).reshape(-1))
    offsets = np.asarray(offsets, dtype=np.uint64)
    # one read per run of tables that lie back to back in the file
    starts = [0] + (np.flatnonzero(np.diff(offsets) != np.uint64(cs)) + 1).tolist()
    for a, b in zip(starts, starts[1:] + [len(offsets)]):
        f.preadinto(mv[a * cs:b * cs], int(offsets[a]))
    return tables


def l2_batches(f, cs, l2offs, indices):
    """(indices, tables) for the L1 ``indices`` whose L2 table offsets are
    ``l2offs[indices]``, a bounded number of tables at a time (in one
    buffer: a batch is overwritten by the next)."""
    step = max(1, L2_BATCH_BYTES // cs)
    buf = np.empty((min(step, len(indices)), cs // 8), dtype=">u8")
    for k in range(0, len(indices), step):
        idx = indices[k:k + step]
        yield idx, read_l2_tables(f, cs, l2offs[idx], buf)
