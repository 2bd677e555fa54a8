"""check -r all's rebuild of the refcount structures, laid out where qemu
7.2's rebuild_refcount_structure puts them.

The check counts the references of every host cluster (qemu's in-memory
refcount table: the old refcount table and blocks are counted too, so
nothing here is written over them).  ``plan`` then places, in that count,
a refcount block for every block range holding a used cluster (at the
first free cluster of its own range or later) and the refcount table in
the first free run of clusters from the start of the file -- again and
again while placing a block grows the table, as qemu does.  The old table
and blocks end up referenced by nothing: qemu's second pass frees them
("Repairing cluster N refcount=1 reference=0") and discards them, and so
does the plan's final count.  ``write`` carries the plan out: the new blocks and table go
to clusters nothing references, and only then does the header name them,
so a crash before the header write leaves the old image as it was.
"""

import numpy as np

from ..spec.constants import BE64, REFTABLE_ENTRY_SIZE
from ..spec.header import pack_fields

# Clusters looked at a time when searching the count (a bounded temporary).
_CHUNK = 1 << 16


def _first(counts, start, end, used):
    """The first cluster in [start, end) that is used (``used``) or free;
    ``end`` if none."""
    end = min(end, len(counts))
    while start < end:
        part = counts[start:min(end, start + _CHUNK)]
        hit = np.flatnonzero(part if used else part == 0)
        if len(hit):
            return start + int(hit[0])
        start += len(part)
    return end


class StructurePlan:
    """Where the new refcount structures go and what they hold."""

    def __init__(self, reftable, reftable_offset, reftable_clusters, counts, freed):
        self.reftable = reftable                    # refcount block offsets, by block index
        self.reftable_offset = reftable_offset
        self.reftable_clusters = reftable_clusters
        self.counts = counts                        # the final refcount of every cluster
        self.freed = freed                          # (cluster, refcount, reference) freed after


class _Placer:
    """qemu's alloc_clusters_imrt and rebuild_refcounts_write_refblocks
    over an array of refcounts (clusters past its end are free)."""

    def __init__(self, geo, counts):
        self.geo = geo
        self.counts = counts
        self.reftable = []          # refcount block offsets; grows a cluster of entries at a time
        self.blocks = []            # clusters of the blocks placed, in order

    def alloc(self, n, first_free):
        """The first run of ``n`` free clusters at or after ``first_free``,
        marked used.  Returns (its first cluster, where the next search may
        start: the first free cluster it saw)."""
        c = self.counts
        start = hint = _first(c, first_free, len(c), used=False)
        while start < len(c):
            end = min(start + n, len(c))
            last_used = end - 1
            while last_used >= start and not c[last_used]:
                last_used -= 1
            if last_used < start:
                break
            start = _first(c, last_used + 1, len(c), used=False)
        if start + n > len(c):
            grown = np.zeros(start + n, dtype=c.dtype)
            grown[:len(c)] = c
            self.counts = c = grown
        c[start:start + n] = 1
        return start, hint

    def place_blocks(self, first, end):
        """A block for each block range holding a used cluster in
        [first, end).  Returns True if the table had to grow."""
        E, cs = self.geo.rb_entries, self.geo.cluster_size
        per_table_cluster = cs // REFTABLE_ENTRY_SIZE
        grown = False
        first_free = 0
        cluster = first
        while cluster < end:
            cluster = _first(self.counts, cluster, end, used=True)
            if cluster >= end:
                break
            index = cluster // E
            if index >= len(self.reftable) or not self.reftable[index]:
                first_free = max(first_free, index * E)
                at, first_free = self.alloc(1, first_free)
                end = max(end, at + 1)
                if index >= len(self.reftable):
                    need = -(-(index + 1) // per_table_cluster) * per_table_cluster
                    self.reftable.extend([0] * (need - len(self.reftable)))
                    grown = True
                self.reftable[index] = at * cs
                self.blocks.append(at)
            cluster = (index + 1) * E
        return grown


def plan(geo, counts, old_structures):
    """The new refcount structures for ``counts`` (the check's count of
    every cluster's references, the old table and blocks included: an
    array with one entry per cluster of the file at least);
    ``old_structures``: the clusters of the old table and blocks that the
    count included."""
    p = _Placer(geo, np.array(counts, dtype=np.uint64))
    p.place_blocks(0, len(p.counts))
    tables = []
    while True:
        n = geo.size_to_clusters(len(p.reftable) * REFTABLE_ENTRY_SIZE)
        start, _ = p.alloc(n, 0)
        tables.append((start, n))
        if not p.place_blocks(start, start + n):
            break
    stored = p.counts
    # qemu's second pass: counted again, the old structures and any table
    # placed before the table grew are referenced by nothing
    final = stored.copy()
    for c in old_structures:
        final[c] -= 1
    for start, n in tables[:-1]:
        final[start:start + n] -= 1
    freed = [(int(c), int(stored[c]), int(final[c])) for c in np.flatnonzero(stored != final)]
    start, n = tables[-1]
    return StructurePlan(p.reftable, start * geo.cluster_size, n, final, freed)


def write(f, geo, structure_plan):
    """Carry out ``structure_plan`` on the image file ``f`` (a File opened
    for writing)."""
    from .._ext.kernels import refcount_encode
    p, E, cs = structure_plan, geo.rb_entries, geo.cluster_size
    block = np.zeros(E, dtype=np.uint64)
    raw = bytearray(cs)
    for index, off in enumerate(p.reftable):
        if not off:
            continue
        part = p.counts[index * E:(index + 1) * E]
        block[:] = 0
        block[:len(part)] = part
        refcount_encode(block, geo.refcount_order, raw)
        f.pwrite(bytes(raw), off)
    table = b"".join(BE64.pack(off) for off in p.reftable)
    f.pwrite(table.ljust(p.reftable_clusters * cs, b"\0"), p.reftable_offset)
    f.sync()        # barrier: the new blocks and table are stable before the header names them
    at, data = pack_fields(refcount_table_offset=p.reftable_offset,
                           refcount_table_clusters=p.reftable_clusters)
    f.pwrite(data, at)
    f.sync()        # barrier: the header's switch is stable before the old structures go
    for c, _, after in p.freed:
        if not after:       # discarded, as qemu's second pass frees them (QCOW2_DISCARD_ALWAYS)
            f.punch_hole(c * cs, cs)
