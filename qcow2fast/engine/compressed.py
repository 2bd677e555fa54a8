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
granularity.  ``_free_byte_offset`` is the next free byte in the last host
cluster that received compressed data (0: none).  A payload continues there
when it fits in that cluster, or when the next cluster the allocator hands
out is the one right after it (the payload then straddles both); otherwise
it starts a new host cluster.  Invariant: every host cluster a compressed
payload touches has its refcount raised by one for it, so a host cluster's
refcount is the number of compressed clusters touching it; a cluster whose
refcount is at the maximum (``refcount_bits=1``: one) takes no more.
``_free_byte_offset`` lives in memory only (qemu: a new session starts a
new cluster) and is forgotten whenever deferred frees run, since the
cluster it points into may then be freed and reused.

Ordering (see image.py): the payload is written, then the L2 entry is set
in the cache; the refcount increases reach the disk before that L2 slice
(the L2 cache depends on the refcount cache; lazy refcounts set the dirty
bit first, in ``_l2_slot_for_write``).  With extended L2 entries a
compressed cluster's bitmap word is 0 (spec).

``CompressedWriteOps`` is a mixin of :class:`qcow2fast.engine.image.Image`.
"""

import numpy as np

from .._ext.kernels import l2_entry_kind
from .compress import Compressor
from ..errors import InvalidArgumentError, Qcow2Error
from ..spec.geometry import L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_ZERO
from .mapping import KIND_NAMES


class CompressedWriteOps:

    def write_compressed(self, offset, data, compressor=None):
        """Write ``data`` at guest ``offset`` as compressed clusters (qemu's
        ``write -c``).  ``offset`` is cluster aligned; ``data`` is whole
        clusters, the last of which may stop at the end of the disk.
        ``compressor``: a :class:`qcow2fast.engine.compress.Compressor` of the
        image's compression type (default: its default level).  Returns
        the number of bytes written."""
        mv = memoryview(data).cast("B")
        self._check_compressed_request(offset, len(mv))
        if compressor is None:
            compressor = Compressor(self.header.compression_type)
        elif compressor.compression_type != self.header.compression_type:
            raise InvalidArgumentError(
                f"the compressor is for compression type {compressor.compression_type}, the "
                f"image uses {self.header.compression_type} ({self.compression_type})")
        cs = self.cluster_size
        payloads = []
        for k in range(0, len(mv), cs):
            chunk = mv[k:k + cs]
            if len(chunk) < cs:         # the disk's last cluster: padded with zeros
                chunk = bytes(chunk) + bytes(cs - len(chunk))
            c = compressor(chunk)
            payloads.append(c if len(c) < cs else chunk)
        self.write_compressed_clusters(offset, payloads)
        return len(mv)

    def write_compressed_clusters(self, offset, payloads):
        """Write already compressed clusters from guest ``offset`` (cluster
        aligned): ``payloads[i]`` is guest cluster i's, either its data
        compressed with the image's compression type (shorter than a
        cluster; not verified) or the whole cluster uncompressed (exactly
        ``cluster_size`` bytes, zero-padded past the end of the disk),
        which is written through the normal write path.  Same rules as
        :meth:`write_compressed`."""
        cs = self.cluster_size
        sizes = [memoryview(p).nbytes for p in payloads]
        for i, n in enumerate(sizes):
            if not 0 < n <= cs:
                raise InvalidArgumentError(f"payload {i} is {n} bytes: a compressed cluster "
                                           f"is 1 to {cs - 1} bytes, an uncompressed one {cs}")
        length = min(len(payloads) * cs, self.size - offset)
        self._check_compressed_request(offset, length)
        if len(payloads) != -(-length // cs):
            raise InvalidArgumentError(f"{len(payloads)} clusters from guest offset {offset:#x} "
                                       f"go past the end of the disk (size {self.size})")
        if payloads:
            self._update(self._write_compressed_locked, offset, payloads)
            if self.writethrough:
                self.flush()

    def _check_compressed_request(self, offset, length):
        self._check_range_py(offset, length)
        self._check_writable()
        cs = self.cluster_size
        if offset % cs:
            raise InvalidArgumentError(f"compressed write at guest offset {offset:#x}: not "
                                       f"aligned to the cluster size ({cs})")
        if length % cs and offset + length != self.size:
            raise InvalidArgumentError(
                f"compressed write of {length} bytes at guest offset {offset:#x}: not whole "
                f"clusters ({cs} bytes) and not ending at the end of the disk ({self.size})")

    # -- under the exclusive lock ---------------------------------------------------

    def _write_compressed_locked(self, offset, payloads):
        cs = self.cluster_size
        # Refuse before writing anything.  A cluster that does not shrink is
        # a normal write, allowed anywhere (qemu falls back to it first too).
        for i, p in enumerate(payloads):
            if memoryview(p).nbytes < cs:
                self._compressed_target_descriptor(offset + i * cs)
        for i, p in enumerate(payloads):
            pos = offset + i * cs
            mv = memoryview(p).cast("B")
            if len(mv) == cs:
                self._write_locked(pos, mv[:min(cs, self.size - pos)])
            else:
                self._write_compressed_cluster(pos, mv)

    def _compressed_target_descriptor(self, pos, slot=None):
        """Guest cluster ``pos``'s descriptor word, which must not point to
        host space (qcow2_alloc_compressed_cluster_offset's check)."""
        geo, mapping = self.geo, self.mapping
        if slot is None:
            l2off = mapping.l2_table_offset(geo.l1_index(pos))
            if not l2off:
                return 0
            slot = self.l2_cache.load(mapping.slice_key(l2off, geo.l2_index(pos)))
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
        return self.l2_cache.u64(slot), i * geo.l2_entry_words

    def _write_compressed_cluster(self, pos, payload):
        """Place one compressed payload and point guest cluster ``pos`` to it."""
        slot = self._l2_slot_for_write(pos)
        self.l2_cache.pin(slot)
        try:
            self._compressed_target_descriptor(pos, slot)   # (unchanged since the check)
            host = self._alloc_bytes(len(payload))
            self.file.pwrite(payload, host)
            cs = self.cluster_size
            end = -(-(host + len(payload)) // cs) * cs
            self.zero_from = max(self.zero_from, end)
            self.alloc_end = max(self.alloc_end, end)
            # Data first, then the entry that points to it.
            words, w = self._descriptor_word(slot, pos)
            words[w] = np.uint64(self.geo.compressed_descriptor(host, len(payload)))
            if self.geo.extended_l2:
                words[w + 1] = np.uint64(0)
            self.l2_cache.mark_dirty(slot, 8 * w, 8 * (w + self.geo.l2_entry_words))
        finally:
            self.l2_cache.unpin(slot)

    def _alloc_bytes(self, n):
        """Host byte offset for ``n`` (< cluster size) bytes of compressed
        data, refcounts raised (qcow2_alloc_bytes; see the module doc)."""
        geo, rc = self.geo, self.refcounts
        cs, cb = geo.cluster_size, geo.cluster_bits
        off = self._free_byte_offset
        if off and not 0 < rc.get(off >> cb) < geo.refcount_max:
            off = 0                     # full (or no longer ours): start a new cluster
        if not off or cs - off % cs < n:
            new = rc.alloc(1)           # refcount 1: this payload's reference
            self._host_limit_changed()
            if self._touches_metadata_py(new, cs):
                self._report_alloc_overlap(new)
            if not off or -(-off // cs) * cs != new:
                off = 0                 # not contiguous: start at the new cluster
            if (off or new) + n > geo.cluster_offset_mask:
                rc.free(new)
                raise Qcow2Error(f"host offset {new:#x} is too large for a compressed "
                                 f"cluster descriptor (cluster_size {cs})")
        if off:
            rc.update(off >> cb, 1, 1)  # the partly filled cluster (the payload may
        else:                           # straddle it and the new one)
            off = new
        if self._touches_metadata_py(off, n):
            self._report_alloc_overlap(off)
        end = off + n
        self._free_byte_offset = end if end % cs else 0
        return off
