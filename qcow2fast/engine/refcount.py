"""Refcounts and the host cluster allocator (qemu's qcow2-refcount.c).

Invariants:
- every host cluster in use (header, tables, refcount structures, data) has
  a refcount >= 1; a cluster with refcount 0 is free;
- a refcount block is written before the refcount table entry that points
  to it, and a new refcount table is complete on disk before the header
  points to it;
- refcount increases reach the disk before any L2 entry that relies on them
  (the L2 cache depends on this cache); decreases of clusters an L2 entry
  stopped using are deferred until that L2 entry is on disk
  (:meth:`Refcounts.apply_deferred_frees`), so a crash can leak a cluster
  but never leave a live cluster marked free.
"""

from array import array

from .._ext import kernels
from .._ext.allocator import RefcountCore
from ..errors import CorruptImageError, LimitExceededError
from ..spec.constants import REFT_OFFSET_MASK, REFT_RESERVED_MASK, REFTABLE_ENTRY_SIZE
from ..spec.constants import BE64 as _BE64
from ..spec.header import MAX_REFTABLE_BYTES, pack_fields
from ..spec.tables import ALL_BITS, decode_table, encode_table


def _first_bad(table, cs, file_size):
    """Index of the first refcount table entry that is not cluster-aligned
    or points past the end of the file, or -1."""
    found = [i for i in (kernels.table_first_with(table, REFT_RESERVED_MASK | (cs - 1)),
                         kernels.table_first_past(table, ALL_BITS, cs, file_size))
             if i >= 0]
    return min(found, default=-1)


class Refcounts(RefcountCore):
    """The refcount table and blocks of an image open for writing, given
    its state; the cluster allocator.  Refcount blocks are cached whole, in
    on-disk form, in ``state.refcount_cache``."""

    def __init__(self, state, file_size, repair=False):
        self.file = state.file
        self.debug_event = state.debug_event    # qemu's blkdebug events (host/blkdebug.py)
        self.geo = geo = state.geo
        self.header = state.header
        self.barrier = state.barrier     # make completed writes stable (not under unsafe)
        self.metadata = state.metadata
        self.allocated = state.allocated    # fresh space used: no longer reads as zeros
        self.deferred = []              # (first cluster, count) to free later
        self.use_cache(state.refcount_cache)
        cs = geo.cluster_size
        self.end_cluster = (file_size + cs - 1) // cs
        self.free_hint = 0
        self._load_table(file_size, repair)

    def use_cache(self, cache):
        """Keep refcount blocks in ``cache`` (at open, and when a resize
        gives the image caches of another size: the old one is clean)."""
        self.cache = cache
        self._rc_setup(cache, self.geo.cluster_bits, self.geo.refcount_order)

    # -- the refcount table ----------------------------------------------------

    def _load_table(self, file_size, repair):
        """Read and validate the refcount table.  With ``repair`` (check -r
        all), invalid entries are dropped -- zeroed in memory and on disk --
        so the rebuild creates those blocks anew, instead of refusing."""
        h, cs = self.header, self.geo.cluster_size
        raw = self.file.pread(h.refcount_table_offset, h.refcount_table_clusters * cs)
        self._set_table(decode_table(raw))
        table = self.table
        while True:
            i = _first_bad(table, cs, file_size)
            if i < 0:
                break
            where = h.refcount_table_offset + 8 * i
            if repair:
                table[i] = 0
                self.file.pwrite(_BE64.pack(0), where)
            elif table[i] & (REFT_RESERVED_MASK | (cs - 1)):
                raise CorruptImageError(f"refcount table entry {i} ({table[i]:#x}) is not "
                                        "cluster-aligned", offset=where, field="refcount table")
            else:
                raise CorruptImageError(f"refcount block at {table[i]:#x} lies past the "
                                        f"end of the file ({file_size} bytes)", offset=where,
                                        field="refcount table")
        if table[0] == 0 and file_size and not repair:
            raise CorruptImageError("refcount table has no block for the header cluster",
                                    offset=h.refcount_table_offset, field="refcount table")
        self.metadata.add_table(table, REFT_OFFSET_MASK, self.geo.cluster_bits)
        self.metadata.add(h.refcount_table_offset >> self.geo.cluster_bits,
                          h.refcount_table_clusters)

    def _block(self, t):
        """Raw view of refcount block ``t`` (which must exist)."""
        slot = self.cache.load(int(self.table[t]))
        return slot, self.cache.raw(slot)

    # -- queries ---------------------------------------------------------------

    def get(self, cluster):
        t = cluster >> self.geo.rb_bits
        if t >= len(self.table) or self.table[t] == 0:
            return 0
        _, blk = self._block(t)
        return kernels.refcount_get(blk, cluster & (self.geo.rb_entries - 1),
                                    self.geo.refcount_order)

    def read_block_values(self, t, out):
        """Decode refcount block ``t`` into ``out`` (a uint64 buffer; zeros
        if the block is absent)."""
        if t >= len(self.table) or self.table[t] == 0:
            kernels.table_and(out, 0)
        else:
            _, blk = self._block(t)
            kernels.refcount_decode(blk, self.geo.refcount_order, out)

    # -- updates ---------------------------------------------------------------

    def update(self, cluster, n, delta):
        """Add ``delta`` to the refcounts of clusters [cluster, cluster+n).
        Raising refcounts creates missing refcount blocks."""
        while True:
            t = self.try_update(cluster, n, delta)
            if t < 0:
                return
            self._alloc_block(t)

    # -- allocation ------------------------------------------------------------

    def alloc(self, n):
        """Allocate ``n`` contiguous host clusters (refcount 1 each) and return
        the host byte offset of the first."""
        while True:
            c = self.try_alloc(n)
            if c >= 0:
                return c << self.geo.cluster_bits
            # A new block may take part of the run: search again after it.
            self._alloc_block(self.missing_block)

    def free(self, offset, n=1):
        """Drop one reference to host clusters [offset, offset + n clusters)."""
        self.debug_event("cluster_free")
        self.update(offset >> self.geo.cluster_bits, n, -1)

    def free_deferred(self, offset, n=1):
        """Free once the L2 entries that stopped using these clusters are on
        disk (see the module invariants)."""
        self.deferred.append((offset, n))

    def apply_deferred_frees(self, on_freed=None):
        """Apply deferred frees; ``on_freed(offset, n)`` is called for each
        run of clusters whose refcount dropped to zero (to discard them in
        the file).  A compressed cluster's host clusters may still hold
        other compressed clusters, so each cluster is checked on its own."""
        pending, self.deferred = self.deferred, []
        for offset, n in pending:
            self.free(offset, n)
        if on_freed is None:
            return
        # Refcounts only went down: a freed cluster at zero now reached it
        # here.  Each block touched is decoded once, not per cluster; runs
        # of zeros are found in C and joined across block boundaries.
        geo = self.geo
        cb, rbb, E = geo.cluster_bits, geo.rb_bits, geo.rb_entries
        blocks = {}
        for offset, n in pending:
            first = offset >> cb
            run = None                      # [first, n] not yet reported
            for t in range(first >> rbb, ((first + n - 1) >> rbb) + 1):
                if t not in blocks:
                    blocks[t] = array("Q", [0]) * E
                    self.read_block_values(t, blocks[t])
                lo, hi = max(first, t * E), min(first + n, (t + 1) * E)
                for a, m in kernels.zero_runs(blocks[t], lo - t * E, hi - lo):
                    a += lo
                    if run is not None and run[0] + run[1] == a:
                        run[1] += m
                        continue
                    if run is not None:
                        on_freed(run[0] << cb, run[1])
                    run = [a, m]
            if run is not None:
                on_freed(run[0] << cb, run[1])

    # -- refcount blocks and table growth --------------------------------------

    def _alloc_block(self, t):
        """Create refcount block ``t``, preferably inside the range it describes."""
        geo = self.geo
        while True:
            if t >= len(self.table):
                self._grow_table(t + 1)
            if self.table[t]:
                return
            b = self.next_free(self.free_hint)
            tb = b >> geo.rb_bits
            if tb == t:
                # Self-describing: the new block holds its own refcount.
                slot = self.cache.new(b << geo.cluster_bits)
                kernels.refcount_set(self.cache.raw(slot), b & (geo.rb_entries - 1),
                                     geo.refcount_order, 1)
            elif tb < len(self.table) and self.table[tb]:
                self.update(b, 1, 1)
                self.cache.new(b << geo.cluster_bits)
            else:
                self._alloc_block(tb)
                continue
            self._publish_block(t, b)
            return

    def _publish_block(self, t, b):
        cs = self.geo.cluster_size
        self.metadata.add(b)
        self.allocated((b + 1) * cs)
        self.end_cluster = max(self.end_cluster, b + 1)
        # Barrier: the block's contents, and the block holding its refcount
        # when it does not hold its own, are on disk before the table points
        # to it (qemu flushes the whole refcount cache here too).
        self.cache.flush()
        self.barrier()
        self.table[t] = b * cs
        self.file.pwrite(_BE64.pack(b * cs), self.header.refcount_table_offset + 8 * t)

    def _grow_table(self, min_entries):
        """Move the refcount table to a larger one at the end of the image,
        with new refcount blocks that describe the table and themselves."""
        geo, cs = self.geo, self.geo.cluster_size
        old = self.table
        old_n = len(old)
        new_n = max(min_entries, old_n + old_n // 2 + 1)
        area = self.end_cluster
        if self.reserved is not None:
            area = max(area, len(self.reserved))
        # The fixed point of Geometry.refcount_layout, with the same sizes
        # (reftable_clusters, refblocks_covering), but not that function: the
        # new table and blocks go at ``area`` (the end of the image), blocks
        # that exist already are reused (only the missing ones among those
        # covering the area count), and the table gets headroom.
        while True:
            table_clusters = geo.reftable_clusters(new_n)
            nblocks = 0
            while True:
                area_end = area + nblocks + table_clusters
                ts = range(area >> geo.rb_bits, geo.refblocks_covering(area_end))
                need = [t for t in ts if t >= old_n or old[t] == 0]
                if len(need) == nblocks:
                    break
                nblocks = len(need)
            if geo.refblocks_covering(area_end) <= new_n:
                break
            new_n = geo.refblocks_covering(area_end)
        if table_clusters * cs > MAX_REFTABLE_BYTES:
            raise LimitExceededError("refcount table would exceed qemu's 8 MiB limit")
        # Area clusters already covered by existing blocks must be free.
        for c in range(area, area_end):
            if (c >> geo.rb_bits) < old_n and old[c >> geo.rb_bits] and self.get(c):
                raise CorruptImageError(f"host cluster {c * cs:#x} past the image end is in use",
                                        offset=c * cs, field="refcount")
        table = array("Q", old)
        table.frombytes(bytes(table_clusters * cs - old_n * REFTABLE_ENTRY_SIZE))
        new_blocks = {t: area + k for k, t in enumerate(need)}
        table_start = area + nblocks
        slots = {}
        for t, b in new_blocks.items():
            table[t] = b * cs
            slots[t] = self.cache.new(b * cs)
            self.cache.pin(slots[t])
        try:
            for c in range(area, area_end):
                t = c >> geo.rb_bits
                if t in slots:
                    kernels.refcount_set(self.cache.raw(slots[t]), c & (geo.rb_entries - 1),
                                         geo.refcount_order, 1)
                else:
                    self.update(c, 1, 1)
            # the new blocks, and the existing ones the new clusters' refcounts went to
            self.cache.flush()
        finally:
            for slot in slots.values():
                self.cache.unpin(slot)
        self.file.pwrite(encode_table(table), table_start * cs)
        # Barrier: new blocks and table are complete before the header
        # points to them.
        self.barrier()
        old_offset, old_clusters = self.header.refcount_table_offset, self.header.refcount_table_clusters
        self.header.refcount_table_offset = table_start * cs
        self.header.refcount_table_clusters = table_clusters
        offset, fields = pack_fields(refcount_table_offset=table_start * cs,
                                     refcount_table_clusters=table_clusters)
        self.file.pwrite(fields, offset)
        self.barrier()
        self._set_table(table)
        for b in new_blocks.values():
            self.metadata.add(b)
        self.metadata.add(table_start, table_clusters)
        self.end_cluster = max(self.end_cluster, area_end)
        self.allocated(area_end * cs)
        self.metadata.remove(old_offset // cs, old_clusters)
        self.free(old_offset, old_clusters)
