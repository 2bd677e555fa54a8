"""Refcounts of whole L1 trees (qemu's qcow2_update_snapshot_refcount, in
bulk): what creating, applying and deleting an internal snapshot does to
the refcounts of every L2 table and cluster an L1 table reaches, and to
the QCOW_OFLAG_COPIED flags of the active tables.

qemu walks the tree entry by entry, updating one refcount at a time.  Here
a tree is read once (its L2 tables, coalesced reads), its references are
tallied per host cluster in C (``l2_tally_tables``, the kernel check
uses), and each refcount block it touches is decoded, changed and encoded
once.  A change is planned in full -- every overflow (a refcount past
``refcount_bits``) or underflow (a reference the refcounts do not hold)
found -- before the first block is touched, so a refused change writes
nothing.

Reference counting (as qemu's check counts): a cluster's refcount is the
number of L1 tables that reach it through some L2 table (one for each
snapshot sharing it, one for the active table); a compressed cluster
counts once on each host cluster it touches.
"""

import numpy as np

from .._ext.kernels import l2_copied_rows, l2_tally_tables, refcount_encode, tally_add
from ..errors import CorruptImageError, LimitExceededError
from ..spec.constants import L1E_OFFSET_MASK, QCOW_OFLAG_COPIED

# COPIED as it sits in a big-endian word viewed as native uint64.
_COPIED_RAW = np.array([QCOW_OFLAG_COPIED], dtype=">u8").view(np.uint64)[0]
_READ_RUN = 32 << 20            # bytes read at once when L2 tables are contiguous


class Tree:
    """The L2 tables one L1 table (native uint64 array, validated by
    ``read_l1_table``) reaches, read from the file: ``tables`` holds one
    table a row, in on-disk form (big-endian words viewed as uint64)."""

    def __init__(self, state, l1):
        geo = state.geo
        self.state, self.geo = state, geo
        self.l1 = l1
        offs = np.asarray(l1) & np.uint64(L1E_OFFSET_MASK)
        self.index = np.flatnonzero(offs)                   # L1 indexes with a table
        self.offsets = offs[self.index].astype(np.int64)    # their L2 table offsets
        words = geo.cluster_size // 8
        self.tables = np.empty((len(self.index), words), dtype=np.uint64)
        self._read()

    def _read(self):
        cs = self.geo.cluster_size
        if not len(self.offsets):
            return
        order = np.argsort(self.offsets, kind="stable")
        sorted_offs = self.offsets[order]
        # Tables at consecutive host clusters are read at once (at most
        # _READ_RUN bytes a read), the others straight into their row.
        starts = np.flatnonzero(np.diff(sorted_offs) != cs) + 1
        bounds = [0] + starts.tolist() + [len(order)]
        per = max(1, _READ_RUN // cs)
        f, rows, offs = self.state.file, order.tolist(), sorted_offs.tolist()
        for k0, k1 in zip(bounds[:-1], bounds[1:]):
            if k1 == k0 + 1:
                f.preadinto(self.tables[rows[k0]], offs[k0])
                continue
            for k in range(k0, k1, per):
                j = min(k1, k + per)
                raw = np.frombuffer(f.pread(offs[k], (j - k) * cs), dtype=np.uint64)
                self.tables[order[k:j]] = raw.reshape(j - k, -1)

    def descriptors(self):
        """A view of the descriptor words (every word, or every other one
        with extended entries), in on-disk form."""
        return self.tables[:, ::self.geo.l2_entry_words]

    def tally(self, counts):
        """Add this tree's references (its L2 tables, their data and
        compressed clusters) to ``counts`` (uint32, one per host cluster).
        A table holding an entry qemu's check would report is corruption."""
        if not len(self.index):
            return
        odd = np.zeros(len(self.index), dtype=np.uint8)
        l2_tally_tables(self.tables, counts, odd, self.geo.cluster_bits,
                        len(counts) << self.geo.cluster_bits, self.geo.extended_l2)
        bad = np.flatnonzero(odd)
        if len(bad):
            r = int(bad[0])
            raise CorruptImageError(
                f"the L2 table at {int(self.offsets[r]):#x} (L1 index {int(self.index[r])}) holds "
                "an invalid entry (reserved bits, an unaligned or out-of-file host offset); "
                "run check -r all", offset=int(self.offsets[r]), field="L2 entry")
        tally_add(counts, self.offsets >> self.geo.cluster_bits)

    def write_rows(self, rows):
        """Write the tables of ``rows`` (indexes into ``tables``) back."""
        f, offs = self.state.file, self.offsets
        for r in rows.tolist() if hasattr(rows, "tolist") else rows:
            f.pwrite(self.tables[r], int(offs[r]))

    def clear_copied(self):
        """Clear COPIED in every descriptor word (the tables are now shared
        or their clusters are); returns the rows that changed."""
        d = self.descriptors()
        rows = np.flatnonzero((d & _COPIED_RAW).any(axis=1))
        d &= ~_COPIED_RAW
        return rows

    def set_copied(self, state):
        """qemu's addend-0 pass over the active tree: COPIED on exactly the
        standard entries whose cluster has refcount 1.  ``state[c]``: 1
        refcount 1, 0 other, 2 unchanged by the operation (not judged: its
        flag was right before).  Returns the rows that changed."""
        changed = np.zeros(len(self.index), dtype=np.uint8)
        if len(changed):
            l2_copied_rows(self.tables, state, self.geo.cluster_bits, changed,
                           self.geo.extended_l2, fix=True)
        return np.flatnonzero(changed)


def host_clusters(state, refcounts):
    """How many host clusters the image spans (allocated or in the file)."""
    return max(refcounts.end_cluster, -(-state.file.size() // state.cluster_size), 1)


def new_counts(state, refcounts):
    """A zeroed tally covering every host cluster of the image."""
    return np.zeros(host_clusters(state, refcounts), dtype=np.uint32)


class Plan:
    """A refcount change of ``addend`` (+1 or -1) times a tally, checked
    over every block it touches when made; ``apply`` adds it to the values
    the blocks hold then (clusters allocated in between are not in the
    tally, so the check still holds)."""

    def __init__(self, refcounts, counts, addend, what):
        geo = refcounts.geo
        self.refcounts, self.addend = refcounts, addend
        self.blocks = []                # (refcount block index, uint64 counts)
        self.freed = np.zeros(0, dtype=np.int64)
        self.state = np.zeros(0, dtype=np.uint8)
        E, maxval = geo.rb_entries, np.uint64(geo.refcount_max)
        table = refcounts.table
        vals = np.empty(E, dtype=np.uint64)
        for t in touched_blocks(counts, geo.rb_bits):
            c = np.zeros(E, dtype=np.uint64)
            part = counts[t * E:(t + 1) * E]
            c[:len(part)] = part
            if t >= len(table) or table[t] == 0:
                first = t * E + int(np.flatnonzero(c)[0])
                raise CorruptImageError(f"host cluster {first << geo.cluster_bits:#x} is "
                                        f"referenced by {what} but has no refcount block",
                                        offset=first << geo.cluster_bits, field="refcount")
            refcounts.read_block_values(t, vals)
            bad = np.flatnonzero(c > maxval - vals if addend > 0 else c > vals)
            if len(bad):
                k = int(bad[0])
                cl = (t * E + k) << geo.cluster_bits
                if addend > 0:
                    raise LimitExceededError(
                        f"{what}: the refcount of host cluster {cl:#x} would exceed "
                        f"{geo.refcount_max} (refcount_bits={geo.refcount_bits}); widen it "
                        "with amend -o refcount_bits=16")
                raise CorruptImageError(
                    f"{what} references host cluster {cl:#x} more often ({int(c[k])}) than its "
                    f"refcount ({int(vals[k])}); run check -r all", offset=cl, field="refcount")
            self.blocks.append((t, c))

    def apply(self):
        """Change the blocks in the refcount cache (dirty: the caller
        writes and orders them); ``freed`` gets the clusters now at 0."""
        rc = self.refcounts
        geo = rc.geo
        cache, order, E = rc.cache, geo.refcount_order, geo.rb_entries
        vals = np.empty(E, dtype=np.uint64)
        freed = []
        top = self.blocks[-1][0] + 1 if self.blocks else 0
        # What the operation did, per cluster: 1 refcount now 1, 0 other, 2 untouched.
        self.state = np.full(top * E, 2, dtype=np.uint8)
        for t, c in self.blocks:
            rc.read_block_values(t, vals)
            new = vals + c if self.addend > 0 else vals - c
            self.state[t * E:(t + 1) * E] = np.where(c != 0, new == 1, 2)
            slot = cache.load(int(rc.table[t]))
            refcount_encode(new, order, cache.raw(slot))
            cache.mark_dirty(slot)
            if self.addend < 0:
                gone = np.flatnonzero((new == 0) & (c != 0))
                if len(gone):
                    freed.append(gone + t * E)
        if freed:
            self.freed = np.concatenate(freed)
            rc.free_hint = min(rc.free_hint, int(self.freed[0]))

    def freed_clusters(self):
        return self.freed


def touched_blocks(counts, rb_bits):
    """The refcount blocks (indexes) holding a nonzero count, in order."""
    E = 1 << rb_bits
    n = -(-len(counts) // E)
    padded = counts if len(counts) == n * E else np.concatenate(
        [counts, np.zeros(n * E - len(counts), dtype=counts.dtype)])
    return np.flatnonzero(padded.reshape(n, E).any(axis=1)).tolist()


def discard_freed(state, clusters):
    """Give freed host clusters back to the file system (qemu's
    QCOW2_DISCARD_SNAPSHOT) and out of the metadata map."""
    if not len(clusters):
        return
    cb = state.cluster_bits
    clusters = np.sort(clusters)
    breaks = np.flatnonzero(np.diff(clusters) != 1) + 1
    for run in np.split(clusters, breaks):
        first, n = int(run[0]), len(run)
        state.metadata.remove(first, n)
        state.file.punch_hole(first << cb, n << cb)
