"""Flush ordering: what makes completed writes durable, in which order
(qemu's qcow2_co_flush_to_os and the cache dependencies of qcow2-cache.c).

The order of one flush, each barrier an fdatasync (none under
``cache=unsafe``):

1. refcount blocks are written, the file grows to cover every cluster
   handed out, barrier (the *data barrier*, :meth:`FlushOrder.data_barrier`):
   the refcounts that new L2 entries rely on, and the data they point to,
   are stable before those entries.  Under lazy refcounts the refcounts are
   not written (the dirty bit was made stable instead and a crash is
   repaired by a rebuild), but the barrier stays whenever an L2 entry
   changed since the last one: it is all that keeps new data (and the file
   growth it implies) ahead of the entry pointing to it.  The one entry
   that needs no barrier under lazy refcounts points into fresh space the
   file already covers stably where the guest saw zeros: a power loss that
   keeps the entry but not the data leaves zeros there, what the guest saw
   before the write.  Under lazy refcounts the data barrier grows the file a
   step past what is allocated (``ImageState.grow_durable``), so only the
   flush after each step's space is used up pays it: an allocating write in
   a sync mode costs one barrier, as in qemu, and no write waits for a
   barrier of its own;
2. L2 slices are written, barrier: the L2 tables are stable before the L1
   entries that point to new ones.  An L2 slice written between flushes
   (evicted) is preceded by the same data barrier, run by the L2 cache
   itself (``TableCache.barrier``, with the refcount cache flushed first
   unless refcounts are lazy);
3. the L1 entries of L2 tables allocated since the last flush are
   written, barrier: they are stable before the clusters they stopped
   using are freed;
4. deferred frees are applied (clusters whose last L2 entry is now on
   disk), their refcount blocks written, barrier.

So a crash can leak a cluster but never leave one in use marked free,
and an L2 entry never reaches the disk before the data it points to
(written before the entry was set in the cache, made stable by the data
barrier before the entry is written), in every mode.
"""


class FlushOrder:
    """The ordered flush of one image, given its state and the subsystems
    whose pending state it writes (the caller holds the exclusive lock)."""

    def __init__(self, state, mapping, refcounts, compressed):
        self.state = state
        self.mapping = mapping
        self.refcounts = refcounts
        self.compressed = compressed

    def flush(self, sync, final=False):
        """Write everything pending in the order of the module doc;
        ``sync``: with barriers; ``final``: also under lazy refcounts
        (close writes the refcounts before clearing the dirty bit)."""
        s, rc = self.state, self.refcounts
        if rc is None:
            return
        f = s.file
        ordered = not s.lazy_refcounts or final
        if ordered:
            s.refcount_cache.flush()
        # (with an external data file, also for in-place writes: they went
        # to another file, which only this barrier syncs)
        if sync and (ordered or s.l2_cache.barrier_pending or s.external_data):
            # barrier: refcounts and data before the L2 entries using them
            # (close's does not grow the file ahead: nothing follows it)
            self.data_barrier(ahead=not final)
        s.l2_cache.barrier_pending = False
        s.l2_cache.flush()
        if s.alloc_end > f.size():
            f.truncate(s.alloc_end)
        if sync:
            f.sync()                # barrier: L2 tables on disk before L1 entries point to them
        if self.mapping.write_pending_l1() and sync:
            f.sync()                # barrier: L1 entries on disk before old L2 tables are freed
        if rc.deferred:
            self.compressed.forget()        # freed host space may be reused
            rc.apply_deferred_frees(self._discard_host)
            if not s.lazy_refcounts or final:
                s.refcount_cache.flush()
                if sync:
                    f.sync()

    def data_barrier(self, ahead=True):
        """Make the data that changed L2 entries point to stable, with the
        file's growth over every cluster handed out (a cluster an entry
        points to is inside the file) and the refcount blocks written so
        far.  The L2 cache calls it before writing a slice.  ``ahead``:
        under lazy refcounts, also make the size stable a step past that."""
        s = self.state
        if ahead and s.lazy_refcounts and not s.unsafe and not s.external_data:
            s.grow_durable(s.alloc_end)     # a step ahead, then the barrier
            return
        if s.alloc_end > s.file.size():
            s.file.truncate(s.alloc_end)
        s.barrier()

    def _discard_host(self, offset, n):
        """Give freed host clusters back to the file system."""
        self.state.file.punch_hole(offset, n << self.state.cluster_bits)
