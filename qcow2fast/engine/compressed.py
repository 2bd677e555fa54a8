"""Writing compressed clusters into an open image (qemu's
qcow2_co_pwritev_compressed_part, qcow2_alloc_compressed_cluster_offset
and qcow2_alloc_bytes; ``qemu-io -c 'write -c ...'``).

Rules, as qemu 7.2:
- a request starts on a cluster boundary and covers whole clusters, except
  that the last one may stop at the end of the disk (it is compressed
  padded with zeros);
- each cluster is compressed on its own with the image's compression type;
  one that does not shrink is written through the normal write path;
- a compressed cluster only goes where nothing is allocated: an
  unallocated cluster or a zero cluster without a host offset.  qemu
  refuses the others with EIO, but writes an incompressible cluster over
  them; so does this, except that a request with a compressed cluster
  bound for an allocated one is refused whole, before anything is written
  (InvalidArgumentError, naming the guest offset).

Placement (qcow2_alloc_bytes): compressed data is packed at byte
granularity.  ``free_byte_offset`` is the next free byte in the last host
cluster that received compressed data (0: none).  A payload continues there
when it fits in that cluster, or when the next cluster the allocator hands
out is the one right after it (the payload then straddles both); otherwise
it starts a new host cluster.  Invariant: every host cluster a compressed
payload touches has its refcount raised by one for it, so a host cluster's
refcount is the number of compressed clusters touching it; a cluster whose
refcount is at the maximum (``refcount_bits=1``: one) takes no more.
``free_byte_offset`` lives in memory only (qemu: a new session starts a
new cluster) and is forgotten whenever deferred frees run, since the
cluster it points into may then be freed and reused.

Ordering (see image.py): the payload is written, then the L2 entry is set
in the cache; the refcount increases reach the disk before that L2 slice
(the L2 cache depends on the refcount cache; lazy refcounts set the dirty
bit first, in ``_l2_slot_for_write``).  With extended L2 entries a
compressed cluster's bitmap word is 0 (spec).

Reading: ``cluster(entry)`` decompresses a cluster, keeping the last few
(a compressed cluster is usually read in several requests).

``CompressedClusters`` belongs to the image's ``Clusters`` (whose
allocation, L2 tables and plain writes it uses); it owns
``free_byte_offset`` and the decompressed-cluster cache, which
``forget()`` drops whenever deferred frees run.  Its methods run under the
image's exclusive lock.
"""

from .._numpy import np

from .._ext.kernels import l2_entry_kind
from ..errors import InvalidArgumentError, LimitExceededError
from ..spec.constants import KIND_NAMES, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_ZERO
from .compress import decompress_cluster

DECOMPRESSED_KEPT = 8          # decompressed clusters kept for the next reads


class CompressedClusters:
    def __init__(self, state, clusters):
        self.state = state
        self.geo = state.geo
        self.clusters = clusters
        self.free_byte_offset = 0       # next byte to pack into (0: none)
        self._decompressed = {}         # host offset -> cluster bytes (small LRU)

    def cluster(self, entry):
        """The decompressed cluster a compressed L2 entry points to."""
        if self.state.external_data:     # qemu: corruption, the read fails
            from .datafile import refuse_compressed
            refuse_compressed(entry, None)
        coff, csize = self.geo.compressed_extent(entry)
        data = self._decompressed.get(coff)
        if data is None:
            raw = self.state.data_file.pread(coff, csize)
            data = decompress_cluster(raw, self.state.header.compression_type,
                                      self.geo.cluster_size, coff)
            if len(self._decompressed) >= DECOMPRESSED_KEPT:
                self._decompressed.pop(next(iter(self._decompressed)))
            self._decompressed[coff] = data
        return data

    def forget(self):
        """Freed host space may be reused: forget what pointed into it."""
        self._decompressed.clear()
        self.free_byte_offset = 0

    # -- under the exclusive lock ---------------------------------------------------

    def write(self, offset, payloads):
        """Guest clusters from ``offset`` (checked by the caller): each
        payload compressed, or a whole cluster written the plain way."""
        cs = self.geo.cluster_size
        size = self.state.size
        # Refuse before writing anything.  A cluster that does not shrink is
        # a normal write, allowed anywhere (qemu falls back to it first too).
        for i, p in enumerate(payloads):
            if memoryview(p).nbytes < cs:
                self._target_descriptor(offset + i * cs)
        for i, p in enumerate(payloads):
            pos = offset + i * cs
            mv = memoryview(p).cast("B")
            if len(mv) == cs:
                self.clusters.write(pos, mv[:min(cs, size - pos)])
            else:
                self._write_cluster(pos, mv)

    def _target_descriptor(self, pos, slot=None):
        """Guest cluster ``pos``'s descriptor word, which must not point to
        host space (qcow2_alloc_compressed_cluster_offset's check)."""
        geo, mapping = self.geo, self.clusters.mapping
        if slot is None:
            l2off = mapping.l2_table_offset(geo.l1_index(pos))
            if not l2off:
                return 0
            slot = self.state.l2_cache.load(mapping.slice_key(l2off, geo.l2_index(pos)))
        words, w = self._descriptor_word(slot, pos)
        desc = int(words[w])
        free = desc == 0 or (desc == QCOW_OFLAG_ZERO and not geo.extended_l2)
        if not free:
            if desc & QCOW_OFLAG_COMPRESSED:
                what = "a compressed cluster"
            elif desc & L2E_OFFSET_MASK:
                kind = "data" if geo.extended_l2 else KIND_NAMES.get(l2_entry_kind(desc), "")
                what = f"an allocated {kind} cluster (host offset {desc & L2E_OFFSET_MASK:#x})"
            else:
                what = f"an L2 entry {desc:#x} with reserved bits set"
            raise InvalidArgumentError(
                f"compressed write at guest offset {pos:#x}: the cluster is {what}; compressed "
                "clusters can only be written where nothing is allocated (unallocated or zero "
                "clusters)")
        return desc

    def _descriptor_word(self, slot, pos):
        geo = self.geo
        i = geo.l2_index(pos) & (geo.slice_entries - 1)
        return self.state.l2_cache.u64(slot), i * geo.l2_entry_words

    def _write_cluster(self, pos, payload):
        """Place one compressed payload and point guest cluster ``pos`` to it."""
        s = self.state
        slot = self.clusters.l2_slot_for_write(pos)
        s.l2_cache.pin(slot)
        try:
            self._target_descriptor(pos, slot)      # (unchanged since the check)
            host = self._alloc_bytes(len(payload))
            s.data_file.pwrite(payload, host)
            cs = self.geo.cluster_size
            s.allocated(-(-(host + len(payload)) // cs) * cs)
            # Data first, then the entry that points to it.
            words, w = self._descriptor_word(slot, pos)
            words[w] = np.uint64(self.geo.compressed_descriptor(host, len(payload)))
            if self.geo.extended_l2:
                words[w + 1] = np.uint64(0)
            s.l2_cache.mark_dirty(slot, 8 * w, 8 * (w + self.geo.l2_entry_words))
        finally:
            s.l2_cache.unpin(slot)

    def _alloc_bytes(self, n):
        """Host byte offset for ``n`` (< cluster size) bytes of compressed
        data, refcounts raised (qcow2_alloc_bytes; see the module doc)."""
        geo, rc = self.geo, self.clusters.refcounts
        cs, cb = geo.cluster_size, geo.cluster_bits
        off = self.free_byte_offset
        if off and not 0 < rc.get(off >> cb) < geo.refcount_max:
            off = 0                     # full (or no longer ours): start a new cluster
        if not off or cs - off % cs < n:
            new = self.clusters.alloc(1)    # refcount 1: this payload's reference
            if not off or -(-off // cs) * cs != new:
                off = 0                 # not contiguous: start at the new cluster
            if (off or new) + n > geo.cluster_offset_mask:
                rc.free(new)
                raise LimitExceededError(f"host offset {new:#x} is too large for a compressed "
                                 f"cluster descriptor (cluster_size {cs})")
        if off:
            rc.update(off >> cb, 1, 1)  # the partly filled cluster (the payload may
        else:                           # straddle it and the new one)
            off = new
        if self.state.overlaps_metadata(off, n):
            self.clusters.overlap_found(off)
        end = off + n
        self.free_byte_offset = end if end % cs else 0
        return off
