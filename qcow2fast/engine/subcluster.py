"""Extended L2 entries: writing, zeroing and discarding at subcluster
granularity (the subcluster half of qemu's qcow2-cluster.c).

An extended L2 entry is two words of a cached slice: the cluster
descriptor (standard or compressed, bit 0 unused) at word 2*i and the
subcluster bitmap at 2*i+1 -- bit s: subcluster s is allocated (its data
is in the host cluster), bit 32+s: subcluster s reads as zeros.

Invariants kept here:
- no subcluster is both allocated and zero; a cluster with allocated
  subclusters has a host offset; a compressed cluster's bitmap is 0;
- a write copies at most the partial subclusters at its edges (and, when
  the host cluster is shared with a snapshot or compressed, the allocated
  subclusters it keeps) -- never the whole cluster;
- data reaches the file before the entry pointing to it (the cache writes
  refcount blocks, then L2 slices), and a host cluster is released
  (deferred until the entry is on disk) only when no entry uses it.

``Subclusters`` is given the image's state and its ``Clusters`` (whose
reads, allocation and release it uses); its methods run under the image's
exclusive lock.
"""

from .._numpy import np

from .._ext.kernels import ext_set_range
from ..spec.constants import (L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
                              SC_ALLOC_MASK, SC_ZERO_SHIFT)


def sc_mask(first, last):
    """Bitmap bits of subclusters first..last (inclusive)."""
    return ((1 << (last - first + 1)) - 1) << first


class Subclusters:
    def __init__(self, state, clusters):
        self.state = state
        self.geo = state.geo
        self.clusters = clusters

    def _entry_words(self, slot, guest_cluster):
        """(slice words, index of the descriptor word) of ``guest_cluster``'s entry."""
        geo = self.geo
        i = geo.l2_index(guest_cluster) & (geo.slice_entries - 1)
        return self.state.l2_cache.u64(slot), 2 * i

    # -- writes ----------------------------------------------------------------------

    def write(self, slot, pos, data):
        """Write ``data`` at guest ``pos`` (inside the slice ``slot``), one
        cluster at a time."""
        cs = self.geo.cluster_size
        done = 0
        while done < len(data):
            p = pos + done
            n = min(len(data) - done, cs - (p & (cs - 1)))
            self._write_in_cluster(slot, p, data[done:done + n])
            done += n

    def _write_in_cluster(self, slot, pos, data):
        geo = self.geo
        cs, scb = geo.cluster_size, geo.subcluster_bits
        first = pos & ~(cs - 1)
        a = pos - first
        b = a + len(data)
        s0, s1 = a >> scb, (b - 1) >> scb
        lo, hi = s0 << scb, (s1 + 1) << scb          # the touched subclusters, whole
        touched = sc_mask(s0, s1)
        words, w = self._entry_words(slot, first)
        desc, bm = int(words[w]), int(words[w + 1])
        alloc, zero = bm & SC_ALLOC_MASK, bm >> SC_ZERO_SHIFT
        host = desc & L2E_OFFSET_MASK
        compressed = bool(desc & QCOW_OFLAG_COMPRESSED)
        # (in an external data file, host offset 0 is a cluster: COPIED says so)
        mapped = bool(host) or (self.state.external_data and not compressed
                                and bool(desc & QCOW_OFLAG_COPIED))
        in_place = mapped and not compressed and bool(desc & QCOW_OFLAG_COPIED)
        if in_place:
            target, keep = host, 0
        else:
            # A new host cluster; a shared or compressed one's allocated
            # subclusters that this write does not cover are copied over.
            keep = (SC_ALLOC_MASK if compressed else (alloc if mapped else 0)) & ~touched
            target = self.clusters.alloc_data(first, 1)
        # Partial subclusters at the edges keep what the guest sees around
        # the write, unless they are already allocated here.
        head = a > lo and not (in_place and alloc >> s0 & 1)
        tail = b < hi and not (in_place and alloc >> s1 & 1)
        start, end = (lo if head else a), (hi if tail else b)
        if keep:
            buf = bytearray(cs)
            self.clusters.read(first, memoryview(buf))       # the old guest view
            buf[a:b] = data
            # from the first to the last subcluster kept or written
            start = min(start, ((keep & -keep).bit_length() - 1) << scb)
            end = max(end, keep.bit_length() << scb)
            pieces = [memoryview(buf)[start:end]]
        else:
            pieces = [data]
            if head:
                pieces.insert(0, self._guest_bytes(first + lo, a - lo))
            if tail:
                pieces.append(self._guest_bytes(first + b, hi - b))
        if in_place:
            self.clusters.check_overlap(first + start, target + start, end - start)
        self.state.write_data_pieces(pieces, target + start, first + start)
        self.state.data_written(target + cs)
        new_alloc = (alloc if in_place else keep) | touched
        new_zero = 0 if compressed else zero & ~touched
        # Data first, then the entry that points to it.
        words[w] = np.uint64(target | QCOW_OFLAG_COPIED)
        words[w + 1] = np.uint64((new_zero << SC_ZERO_SHIFT) | new_alloc)
        self.state.l2_cache.mark_dirty(slot, 8 * w, 8 * w + 16)
        if not in_place and (host or compressed):
            self.clusters.release_entry(desc)

    def _guest_bytes(self, pos, n):
        """What the guest reads at [pos, pos+n) now (under the lock)."""
        buf = bytearray(n)
        self.clusters.read(pos, memoryview(buf))
        return buf

    # -- zeroes and discard ---------------------------------------------------------

    def set_range(self, a, b, what, unmap):
        """Make the whole subclusters [a, b) read as zeros ("zero", or
        "discard" over a backing file) or become unallocated ("discard"
        without one, "full" always: shrink), releasing a host cluster once none of its
        subclusters is allocated and ``unmap`` (always for discard).  The
        bitmaps change in a kernel, a slice at a time; a compressed or
        shared cluster covered in part is copied first (the zeros written
        into it leave its other subclusters as they were)."""
        geo = self.geo
        cs, scb = geo.cluster_size, geo.subcluster_bits
        reads_zero = what == "zero" or (what == "discard" and self.clusters.below is not None)
        cache = self.state.l2_cache
        unmap = unmap or what in ("discard", "full")
        released = np.zeros(geo.slice_entries, dtype=np.uint64)
        pos = a
        while pos < b:
            l1i = geo.l1_index(pos)
            span_end = min(b, (l1i + 1) * geo.bytes_per_l2())
            if self.clusters.mapping.l2_table_offset(l1i) == 0 and not reads_zero:
                pos = span_end          # already unallocated and without a backing file
                continue
            slot = self.clusters.l2_slot_for_write(pos)
            cache.pin(slot)
            try:
                words = cache.u64(slot)
                base = pos & ~(geo.slice_entries * cs - 1)      # the slice's first guest byte
                stop_at = min(span_end, base + geo.slice_entries * cs)
                u, u_end = (pos - base) >> scb, (stop_at - base) >> scb
                while u < u_end:
                    changed, n, stop = ext_set_range(words, u, u_end, reads_zero, unmap,
                                                     geo.cluster_bits, released)
                    if changed:
                        cache.mark_dirty(slot)
                    for desc in released[:n].tolist():
                        self.clusters.release_entry(desc, discard=True)
                    if stop < 0:
                        break
                    last = min(u_end, ((stop >> 5) + 1) << 5)
                    self._write_in_cluster(slot, base + (stop << scb),
                                           bytes((last - stop) << scb))
                    u = stop                # now a cluster of its own: the kernel zeroes it
                pos = stop_at
            finally:
                cache.unpin(slot)
