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
nothing.  (resize.py's shrink tallies the L2 tables it drops with ``Tree``
too, a slice of the L1 table at a time.)

Reference counting (as qemu's check counts): a cluster's refcount is the
number of L1 tables that reach it through some L2 table (one for each
snapshot sharing it, one for the active table); a compressed cluster
counts once on each host cluster it touches.
"""

from array import array

from .._ext.kernels import (l2_clear_copied, l2_copied_rows, l2_tally_tables, nonzero_blocks,
                            refcount_change_apply, refcount_change_check, refcount_encode,
                            tally_add)
from ..errors import CorruptImageError, LimitExceededError
from ..spec.constants import L1E_OFFSET_MASK

_READ_RUN = 32 << 20            # bytes read at once when L2 tables are contiguous


def _rows(flags):
    """The indexes of the nonzero bytes of ``flags``."""
    return [i for i, v in enumerate(flags) if v]


class Tree:
    """The L2 tables one L1 table (native uint64 array, validated by
    ``read_l1_table``) reaches, read from the file: ``tables`` holds one
    table a row (a 2-D uint64 view of ``raw``), in on-disk form (big-endian
    words viewed as native ones); ``index`` the L1 indexes with a table,
    ``offsets`` their tables' host offsets (``tables`` is None if there
    are none)."""

    def __init__(self, state, l1):
        geo = state.geo
        self.state, self.geo = state, geo
        self.l1 = l1
        self.index = [i for i, e in enumerate(l1) if e & L1E_OFFSET_MASK]
        self.offsets = [l1[i] & L1E_OFFSET_MASK for i in self.index]
        cs = geo.cluster_size
        self.raw = memoryview(bytearray(len(self.index) * cs))
        self.tables = None              # (no tables: a memoryview cannot have a 0 in its shape)
        if self.index:
            self.tables = self.raw.cast("Q", (len(self.index), cs // 8))
            self._read()

    def _read(self):
        cs = self.geo.cluster_size
        per = max(1, _READ_RUN // cs)
        f, offs = self.state.file, self.offsets
        order = sorted(range(len(offs)), key=offs.__getitem__)
        # Tables at consecutive host clusters that are consecutive rows too
        # (an L1 table written in order) are read at once, at most
        # _READ_RUN bytes a read.
        k = 0
        while k < len(order):
            r, j = order[k], k + 1
            while j < len(order) and j - k < per and order[j] == r + (j - k) \
                    and offs[order[j]] == offs[r] + (j - k) * cs:
                j += 1
            f.preadinto(self.raw[r * cs:(r + j - k) * cs], offs[r])
            k = j

    def tally_mapped(self, counts):
        """Add the clusters the L2 tables map (data and compressed) to
        ``counts`` (uint32, one per host cluster), except from a table
        holding an entry qemu's check would report: the rows of those are
        returned, untallied."""
        if not self.index:
            return []
        odd = bytearray(len(self.index))
        l2_tally_tables(self.tables, counts, odd, self.geo.cluster_bits,
                        len(counts) << self.geo.cluster_bits, self.geo.extended_l2)
        return _rows(odd)

    def tally(self, counts):
        """Add this tree's references (its L2 tables, their data and
        compressed clusters) to ``counts`` (uint32, one per host cluster).
        A table holding an entry qemu's check would report is corruption."""
        if not self.index:
            return
        bad = self.tally_mapped(counts)
        if bad:
            r = bad[0]
            raise CorruptImageError(
                f"the L2 table at {self.offsets[r]:#x} (L1 index {self.index[r]}) holds "
                "an invalid entry (reserved bits, an unaligned or out-of-file host offset); "
                "run check -r all", offset=self.offsets[r], field="L2 entry")
        tally_add(counts, array("q", [o >> self.geo.cluster_bits for o in self.offsets]))

    def write_rows(self, rows):
        """Write the tables of ``rows`` (indexes into ``tables``) back."""
        f, cs = self.state.file, self.geo.cluster_size
        for r in rows:
            f.pwrite(self.raw[r * cs:(r + 1) * cs], self.offsets[r])

    def clear_copied(self):
        """Clear COPIED in every descriptor word (the tables are now shared
        or their clusters are); returns the rows that changed."""
        changed = bytearray(len(self.index))
        if self.index:
            l2_clear_copied(self.tables, changed, self.geo.extended_l2)
        return _rows(changed)

    def set_copied(self, state):
        """qemu's addend-0 pass over the active tree: COPIED on exactly the
        standard entries whose cluster has refcount 1.  ``state[c]``: 1
        refcount 1, 0 other, 2 unchanged by the operation (not judged: its
        flag was right before).  Returns the rows that changed."""
        changed = bytearray(len(self.index))
        if self.index:
            l2_copied_rows(self.tables, state, self.geo.cluster_bits, changed,
                           self.geo.extended_l2, fix=True)
        return _rows(changed)


def host_clusters(state, refcounts):
    """How many host clusters the image spans (allocated or in the file)."""
    return max(refcounts.end_cluster, -(-state.file.size() // state.cluster_size), 1)


def new_counts(state, refcounts):
    """A zeroed tally (uint32) covering every host cluster of the image."""
    return array("I", [0]) * host_clusters(state, refcounts)


class Plan:
    """A refcount change of ``addend`` (+1 or -1) times a tally, checked
    over every block it touches when made; ``apply`` adds it to the values
    the blocks hold then (clusters allocated in between are not in the
    tally, so the check still holds).  The tally is not changed after."""

    def __init__(self, refcounts, counts, addend, what):
        geo = refcounts.geo
        self.refcounts, self.addend = refcounts, addend
        self.blocks = []                # (refcount block index, its part of the tally)
        self.freed = []                 # runs (first cluster, n) now at refcount 0
        self.state = bytearray()
        E = geo.rb_entries
        table = refcounts.table
        counts = memoryview(counts)
        vals = array("Q", [0]) * E
        for t in nonzero_blocks(counts, geo.rb_bits):
            c = counts[t * E:(t + 1) * E]
            if t >= len(table) or table[t] == 0:
                first = t * E + _rows(c)[0]
                raise CorruptImageError(f"host cluster {first << geo.cluster_bits:#x} is "
                                        f"referenced by {what} but has no refcount block",
                                        offset=first << geo.cluster_bits, field="refcount")
            refcounts.read_block_values(t, vals)
            k = refcount_change_check(c, vals, addend, geo.refcount_max)
            if k >= 0:
                cl = (t * E + k) << geo.cluster_bits
                if addend > 0:
                    raise LimitExceededError(
                        f"{what}: the refcount of host cluster {cl:#x} would exceed "
                        f"{geo.refcount_max} (refcount_bits={geo.refcount_bits}); widen it "
                        "with amend -o refcount_bits=16")
                raise CorruptImageError(
                    f"{what} references host cluster {cl:#x} more often ({c[k]}) than its "
                    f"refcount ({vals[k]}); run check -r all", offset=cl, field="refcount")
            self.blocks.append((t, c))

    def apply(self):
        """Change the blocks in the refcount cache (dirty: the caller
        writes and orders them); ``freed`` gets the runs of clusters now
        at 0, in order."""
        rc = self.refcounts
        geo = rc.geo
        cache, order, E = rc.cache, geo.refcount_order, geo.rb_entries
        vals = array("Q", [0]) * E
        top = self.blocks[-1][0] + 1 if self.blocks else 0
        # What the operation did, per cluster: 1 refcount now 1, 0 other, 2 untouched.
        self.state = bytearray(b"\x02") * (top * E)
        state = memoryview(self.state)
        for t, c in self.blocks:
            rc.read_block_values(t, vals)
            self.freed += refcount_change_apply(vals, c, self.addend, state[t * E:(t + 1) * E],
                                                t * E)
            slot = cache.load(int(rc.table[t]))
            refcount_encode(vals, order, cache.raw(slot))
            cache.mark_dirty(slot)
        if self.freed:
            rc.free_hint = min(rc.free_hint, self.freed[0][0])


def discard_freed(state, runs):
    """Give freed host clusters (runs of (first, n)) back to the file
    system (qemu's QCOW2_DISCARD_SNAPSHOT) and out of the metadata map."""
    cb = state.cluster_bits
    for first, n in runs:
        state.metadata.remove(first, n)
        state.file.punch_hole(first << cb, n << cb)
