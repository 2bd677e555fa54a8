"""The Python half of the data path (qemu's qcow2-cluster.c and the slow
paths of qcow2.c): what the C path in ``_ext/core.pyx`` hands over --
reads of compressed clusters and malformed entries, allocating writes that
copy (backing data, compressed or shared clusters), new L2 tables, zeroes
and discard.  Every method runs under the image's exclusive lock.

Invariants (with the write ordering of engine/flush.py):
- guest data reaches its new host clusters before the L2 entries that
  point to them are changed in the cache;
- a host cluster an L2 entry stopped using is freed only after that entry
  is on disk (``Refcounts.free_deferred``);
- guest data never goes to a host cluster that holds metadata: the
  allocator's answer is checked (corruption otherwise), and so is every
  in-place overwrite.
"""

from array import array

from .._ext.kernels import l2_entry_kind, zero_runs
from ..errors import CorruptImageError
from ..extent import Extent
from ..spec.entries import at_host0
from ..spec.constants import (COMPRESSED, DATA, INVALID, KIND_NAMES, L2E_OFFSET_MASK,
                              QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO,
                              UNALLOCATED, ZERO)
from . import features
from .compressed import CompressedClusters
from .datafile import DataFile
from .subcluster import Subclusters


class Clusters:
    """Guest clusters of one image: given its state and its collaborators.

    ``fast_read(offset, mv)``: the C read loop under the exclusive lock
    (returns the bytes it did); ``below``: the backing image or None;
    ``overlap_found(host)``: marks the image corrupt and raises."""

    def __init__(self, state, mapping, refcounts, below, fast_read, overlap_found):
        self.state = state
        self.geo = state.geo
        self.mapping = mapping
        self.refcounts = refcounts
        self.below = below
        self.fast_read = fast_read
        self.overlap_found = overlap_found
        self.compressed = CompressedClusters(state, self)
        self.subclusters = Subclusters(state, self) if state.extended else None
        # An external data file: data clusters sit at their guest offsets
        # there, without refcounts (engine/datafile.py).
        self.datafile = DataFile(state) if state.external_data else None

    # -- reads ------------------------------------------------------------------------

    def read(self, offset, mv):
        """Guest [offset, offset+len(mv)) into ``mv``, whatever it maps to."""
        s = self.state
        done, total = 0, len(mv)
        while done < total:
            done += self.fast_read(offset + done, mv[done:])
            if done == total:
                break
            pos = offset + done
            kind, host, n, entry = self.mapping.run_at(pos, total - done, s.host_limit)
            out = mv[done:done + n]
            if kind == UNALLOCATED:
                self.read_below(pos, out)
            elif kind == COMPRESSED:
                data = self.compressed.cluster(entry)
                in_cl = self.geo.offset_into_cluster(pos)
                out[:] = data[in_cl:in_cl + n]
            elif kind == ZERO:
                out[:] = bytes(n)
            else:
                s.read_data_into(out, host, pos)
            done += n

    def read_below(self, pos, out):
        """What the layers below show at guest ``pos`` (zeros without a
        backing file and past its end)."""
        n = len(out)
        b = self.below
        if b is None or pos >= b.size:
            out[:] = bytes(n)
            return
        k = min(n, b.size - pos)
        b.readinto(pos, out[:k])
        if k < n:
            out[k:] = bytes(n - k)

    def layer_extents(self, offset, length, host_limit=None):
        """This layer's extents of [offset, offset+length).  ``host_limit``:
        where data clusters must end (default: the file's end, as for a
        read; block status passes NO_HOST_LIMIT and reports, as qemu does,
        data clusters past the end, which reads still refuse)."""
        pos, end = offset, offset + length
        limit = self.state.host_limit if host_limit is None else host_limit
        while pos < end:
            kind, host, n, entry = self.mapping.run_at(pos, end - pos, limit)
            if not host and not (self.state.external_data
                                 and (kind == DATA or at_host0(int(entry)))):
                host = None     # (zero or unallocated: a preallocated cluster keeps it)
            yield Extent(pos, n, KIND_NAMES[kind], host, 0)
            pos += n

    # -- writes -----------------------------------------------------------------------

    def l2_slot_for_write(self, pos):
        """The cached L2 slice mapping guest ``pos``, made writable (a new
        or copied L2 table; under lazy refcounts the dirty bit first)."""
        s = self.state
        if s.lazy_refcounts and not features.is_dirty(s):
            features.set_dirty(s, True)
        slot = self.mapping.l2_slot_for_write(pos, self.refcounts)
        self.host_limit_changed()
        return slot

    def host_limit_changed(self):
        """The allocator may have grown the image: L2 entries may point there."""
        self.state.grow_host_limit(self.refcounts.end_cluster << self.geo.cluster_bits)

    def alloc(self, n):
        """``n`` new contiguous host clusters (refcount 1), checked against
        the metadata; returns the host offset of the first."""
        new = self.refcounts.alloc(n)
        self.host_limit_changed()
        if self.state.overlaps_metadata(new, n << self.geo.cluster_bits):
            self.overlap_found(new)
        return new

    def alloc_data(self, guest, n):
        """Host clusters for ``n`` guest clusters from ``guest`` (cluster
        aligned): in the image file (``alloc``) or, with a data file, at the
        guest offset there."""
        if self.datafile is not None:
            return self.datafile.alloc(guest, n)
        return self.alloc(n)

    def check_overlap(self, pos, host, n):
        if self.state.overlaps_metadata(host, n):
            raise CorruptImageError(
                f"guest offset {pos:#x} maps to host offset {host:#x}, which holds metadata; "
                "writing there would destroy it", offset=self.mapping.entry_location(pos),
                field="L2 entry")

    def write(self, offset, mv):
        """Guest data ``mv`` at ``offset``: in place where the cluster is this
        layer's own, into new clusters (copying what the guest saw around
        the write) elsewhere."""
        s = self.state
        done, total = 0, len(mv)
        while done < total:
            pos = offset + done
            slot = self.l2_slot_for_write(pos)
            s.l2_cache.pin(slot)
            try:
                kind, host, n, entry = self.mapping.run_at(pos, total - done, s.host_limit,
                                                           need_copied=True)
                if kind == DATA and entry & QCOW_OFLAG_COPIED:
                    self.check_overlap(pos, host, n)
                    s.write_data_pieces([mv[done:done + n]], host, pos)
                elif self.subclusters is not None:
                    self.subclusters.write(slot, pos, mv[done:done + n])
                else:
                    self._allocating_write(slot, pos, mv[done:done + n])
            finally:
                s.l2_cache.unpin(slot)
            done += n

    def _allocating_write(self, slot, pos, data):
        """Write ``data`` at guest ``pos`` into newly allocated clusters,
        copying the untouched parts of the first and last cluster from what
        the guest saw before (backing file, compressed or shared cluster)."""
        s, geo = self.state, self.geo
        cs = geo.cluster_size
        first = geo.start_of_cluster(pos)
        nclusters = geo.size_to_clusters(pos + len(data) - first)
        head = pos - first
        tail = nclusters * cs - head - len(data)
        l2 = s.l2_cache.u64(slot)
        i0 = geo.l2_index(first) & (geo.slice_entries - 1)
        old = [int(e) for e in l2[i0:i0 + nclusters]]
        new = self.alloc_data(first, nclusters)
        fresh = new >= s.zero_from
        pieces = []
        if head:
            pieces.append(self._old_bytes(first, 0, head, old[0], fresh))
        pieces.append(data)
        if tail:
            pieces.append(self._old_bytes(first + (nclusters - 1) * cs, cs - tail, tail, old[-1],
                                          fresh))
        # Drop leading/trailing pieces that are zeros over fresh (zero) space.
        start = 0
        if pieces[0] is None:
            pieces.pop(0)
            start = head
        if pieces[-1] is None:
            pieces.pop()
        s.write_data_pieces(pieces, new + start, first + start)
        s.data_written(new + nclusters * cs)
        # Data first, then the L2 entries that point to it.
        for k in range(nclusters):
            l2[i0 + k] = (new + k * cs) | QCOW_OFLAG_COPIED
        s.l2_cache.mark_dirty(slot, 8 * i0, 8 * (i0 + nclusters))
        for e in old:
            self.release_entry(e)

    def _old_bytes(self, guest_cluster, start, n, entry, fresh):
        """What the guest read at [guest_cluster+start, +n) before this write,
        or None if it is zeros and the target is fresh (already zero)."""
        kind = l2_entry_kind(entry, self.state.external_data)
        if kind == ZERO or (kind == UNALLOCATED and self.below is None):
            return None if fresh else bytes(n)
        buf = bytearray(n)
        if kind == UNALLOCATED:
            self.read_below(guest_cluster + start, memoryview(buf))
        elif kind == COMPRESSED:
            buf[:] = self.compressed.cluster(entry)[start:start + n]
        else:   # a data cluster shared with a snapshot
            self.state.read_data_into(buf, (entry & L2E_OFFSET_MASK) + start, guest_cluster + start)
        if fresh and not any(buf):
            return None
        return buf

    def release_entry(self, entry, discard=False):
        """Drop the reference an L2 entry held (deferred, see the module doc);
        ``discard``: the guest discarded it (a data file punches it)."""
        if self.datafile is not None:
            return self.datafile.release(entry, discard)
        kind = l2_entry_kind(entry)
        rc = self.refcounts
        if kind == COMPRESSED:
            first, last = self.geo.compressed_clusters(entry)
            rc.free_deferred(first << self.geo.cluster_bits, last - first + 1)
        elif kind in (DATA, ZERO) and entry & L2E_OFFSET_MASK:
            rc.free_deferred(entry & L2E_OFFSET_MASK, 1)

    # -- zeroes and discard -----------------------------------------------------------

    def whole_units(self, offset, end):
        """[a, b): the whole allocation units (clusters, or subclusters with
        extended L2 entries) inside [offset, end).  The last one of the disk
        counts as whole when the range reaches the disk's end."""
        cs = self.geo.subcluster_size
        a = -(-offset // cs) * cs
        b = -(-end // cs) * cs if end == self.state.size else end - end % cs
        return a, max(a, b)

    def write_zeroes(self, offset, length, may_unmap):
        """Make [offset, offset+length) read as zeros, without writing data
        where the format allows."""
        end = offset + length
        a, b = self.whole_units(offset, end)
        if a >= b:
            edges = [(offset, end)]
        else:
            edges = [(offset, a), (min(b, end), end)]
        # Partial clusters at the edges: write zeros unless they already read so.
        for lo, hi in edges:
            if hi > lo and not self._reads_as_zero(lo, hi - lo):
                self._write_zero_bytes(lo, hi - lo)
        if a >= b:
            return
        if self.state.header.version < 3 and (self.below is not None or not may_unmap):
            # v2 has no zero flag: write zeros where the clusters do not
            # already read as zeros (deallocating needs may_unmap and no
            # backing file).
            for ext in list(self.layer_extents(a, min(b, self.state.size) - a)):
                if ext.kind == "unallocated" and self.below is None:
                    continue
                self._write_zero_bytes(ext.offset, ext.length)
            return
        if self.datafile is not None:   # data_file_raw: the data file first (qemu)
            self.datafile.zero(a, min(b, self.state.size) - a)
        self.set_entries(a, b, "zero", may_unmap or self.state.header.version < 3)

    def _write_zero_bytes(self, offset, length):
        chunk = 1 << 20
        zeros = memoryview(bytes(min(chunk, length)))
        for pos in range(offset, offset + length, chunk):
            self.write(pos, zeros[:min(chunk, offset + length - pos)])

    def _reads_as_zero(self, offset, length):
        for ext in self.layer_extents(offset, length):
            if ext.kind not in ("zero", "unallocated") or (ext.kind == "unallocated"
                                                          and self.below is not None):
                return False
        return True

    def discard(self, offset, length):
        """Free the whole clusters of [offset, offset+length)."""
        a, b = self.whole_units(offset, offset + length)
        if b <= a:
            return
        if b >= self.state.size:    # the last cluster whole, subclusters past the end too (qemu)
            b = self.geo.size_to_clusters(self.state.size) << self.geo.cluster_bits
        self.set_entries(a, b, "discard", True)

    def set_entries(self, a, b, what, unmap):
        """Rewrite the L2 entries of whole clusters [a, b) to read as zeros
        (or, v2 / no backing, to be unallocated), releasing host clusters
        when ``unmap``.  ``what``: "zero", "discard", or "full" (a discard
        that leaves the clusters unallocated even over a backing file:
        shrink)."""
        if self.subclusters is not None:
            return self.subclusters.set_range(a, b, what, unmap)
        s, geo = self.state, self.geo
        v3 = s.header.version >= 3
        pos = a
        while pos < b:
            l1i = geo.l1_index(pos)
            span = min(b, (l1i + 1) * geo.bytes_per_l2()) - pos
            if self.mapping.l2_table_offset(l1i) == 0 and (not v3 or what == "full" or (
                    self.below is None and what == "discard")):
                # whole L2 range unallocated: already zero (a v3 zero request
                # still writes zero flags there, in a new L2 table, as qemu)
                pos += span
                continue
            slot = self.l2_slot_for_write(pos)
            s.l2_cache.pin(slot)
            try:
                l2 = s.l2_cache.u64(slot)
                i0 = geo.l2_index(pos) & (geo.slice_entries - 1)
                n = min(geo.slice_entries - i0, (b - pos) >> geo.cluster_bits)
                for k in range(n):
                    e = int(l2[i0 + k])
                    kind = l2_entry_kind(e)
                    if kind == INVALID:
                        raise CorruptImageError(f"invalid L2 entry {e:#x}",
                                                offset=s.l2_cache.key(slot) + 8 * (i0 + k),
                                                field="L2 entry")
                    if v3 and what != "full" and (self.below is not None or what == "zero"):
                        keep = (not unmap and kind in (DATA, ZERO) and e & QCOW_OFLAG_COPIED
                                and e & L2E_OFFSET_MASK)
                        new = (e & L2E_OFFSET_MASK) | QCOW_OFLAG_COPIED | QCOW_OFLAG_ZERO \
                            if keep else QCOW_OFLAG_ZERO
                    else:
                        keep, new = False, 0
                    if new != e:
                        l2[i0 + k] = new
                        if not keep:
                            self.release_entry(e, discard=True)
                s.l2_cache.mark_dirty(slot)
            finally:
                s.l2_cache.unpin(slot)
            pos += n << geo.cluster_bits

    # -- preallocation -----------------------------------------------------------------

    def has_host_cluster(self, pos):
        """Whether this layer's entry for guest ``pos`` has a host cluster
        (data, preallocated or compressed): what preallocate() keeps."""
        entry = self.mapping.run_at(pos, 1, self.state.host_limit)[3]
        return bool(entry & (L2E_OFFSET_MASK | QCOW_OFLAG_COMPRESSED))

    def preallocate(self, mode, start=0, end=None):
        """Map every guest cluster of [start, end) (``start`` cluster
        aligned; default: the whole disk) that has no host cluster to one
        (qemu's preallocation: ``metadata``, ``falloc`` or ``full``).  A
        mapped one is kept as it is, as qemu's alloc_host_offset keeps it:
        after a snapshot's apply, the VM state its L1 table carried past
        the disk's end is mapped there when the disk grows over it."""
        s, geo = self.state, self.geo
        end = s.size if end is None else end
        total = geo.size_to_clusters(end)
        k = geo.l2_entry_words
        pos = start
        while pos < end:
            slot = self.l2_slot_for_write(pos)
            l2 = s.l2_cache.u64(slot)
            i0 = geo.l2_index(pos) & (geo.slice_entries - 1)
            n = min(geo.slice_entries - i0, total - (pos >> geo.cluster_bits))
            for a, m in zero_runs(l2, i0 * k, n, k, L2E_OFFSET_MASK | QCOW_OFLAG_COMPRESSED):
                self._preallocate_run(mode, slot, l2, i0 + a, m, pos + (a << geo.cluster_bits),
                                      end)
            pos += n << geo.cluster_bits

    def _preallocate_run(self, mode, slot, l2, i0, n, pos, end):
        """Map the ``n`` unmapped entries from ``i0`` of the L2 slice in
        ``slot`` (guest ``pos`` on) to new host clusters, as preallocate()."""
        s, geo = self.state, self.geo
        cs = geo.cluster_size
        new = self.alloc_data(pos, n) if self.datafile is not None else self.refcounts.alloc(n)
        self.host_limit_changed()
        # (extended entries: a host cluster, no subcluster allocated -- as qemu)
        k = geo.l2_entry_words
        first = new | QCOW_OFLAG_COPIED       # (offsets stay below bit 63: no carry)
        l2[i0 * k:(i0 + n) * k:k] = array("Q", range(first, first + n * cs, cs))
        s.l2_cache.mark_dirty(slot)
        host_end = new + n * cs
        if self.datafile is not None:
            # qemu's preallocate_co: the data file covers the clusters
            self.datafile.grow_to(min(host_end, end) if mode == "metadata" else host_end, mode)
            return
        s.alloc_end = max(s.alloc_end, host_end)
        if mode != "full" and new < s.zero_from and not s.data_file.is_device:
            # Reused space of a file holds old bytes: the mapped clusters
            # must read as zeros (qemu discards what it frees).  (A
            # device's clusters keep its old data, as in qemu.)
            self._zero_host(new, min(host_end, s.zero_from), mode, pos)
        if mode == "falloc":
            s.data_file.fallocate(new, n * cs)
        elif mode == "full":
            zeros = memoryview(bytes(min(n * cs, 1 << 20)))
            for off in range(new, host_end, len(zeros)):
                s.write_data_pieces([zeros[:min(len(zeros), host_end - off)]], off,
                                    pos + (off - new))

    def _zero_host(self, lo, hi, mode, guest):
        """Host [lo, hi) (guest offset ``guest`` at ``lo``) reads as zeros."""
        f = self.state.data_file
        done = f.punch_hole(lo, hi - lo) if mode == "metadata" else f.zero_range(lo, hi - lo)
        if not done or self.state.transform is not None:
            zeros = memoryview(bytes(min(hi - lo, 1 << 20)))
            for off in range(lo, hi, len(zeros)):
                self.state.write_data_pieces([zeros[:min(len(zeros), hi - off)]], off,
                                             guest + (off - lo))
