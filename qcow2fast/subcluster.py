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

``SubclusterOps`` is a mixin of :class:`qcow2fast.image.Image`; its
methods run under the image's exclusive lock.
"""

import numpy as np

from .geometry import (L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, SC_ALLOC_MASK,
                       SC_ZERO_SHIFT, SUBCLUSTERS)

ALL_ZERO = SC_ALLOC_MASK << SC_ZERO_SHIFT


def sc_mask(first, last):
    """Bitmap bits of subclusters first..last (inclusive)."""
    return ((1 << (last - first + 1)) - 1) << first


class SubclusterOps:

    def _entry_words(self, slot, guest_cluster):
        """(slice words, index of the descriptor word) of ``guest_cluster``'s entry."""
        geo = self.geo
        i = geo.l2_index(guest_cluster) & (geo.slice_entries - 1)
        return self.l2_cache.u64(slot), 2 * i

    # -- writes ----------------------------------------------------------------------

    def _write_subclusters(self, slot, pos, data):
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
        in_place = bool(host) and not compressed and bool(desc & QCOW_OFLAG_COPIED)
        if in_place:
            target, keep = host, 0
        else:
            # A new host cluster; a shared or compressed one's allocated
            # subclusters that this write does not cover are copied over.
            keep = (SC_ALLOC_MASK if compressed else (alloc if host else 0)) & ~touched
            target = self.refcounts.alloc(1)
            self._host_limit_changed()
            if self._touches_metadata_py(target, cs):
                self._report_alloc_overlap(target)
        # Partial subclusters at the edges keep what the guest sees around
        # the write, unless they are already allocated here.
        head = a > lo and not (in_place and alloc >> s0 & 1)
        tail = b < hi and not (in_place and alloc >> s1 & 1)
        start, end = (lo if head else a), (hi if tail else b)
        if keep:
            buf = bytearray(cs)
            self._read_locked(first, memoryview(buf))        # the old guest view
            buf[a:b] = data
            for s in range(SUBCLUSTERS):
                if keep >> s & 1:
                    start, end = min(start, s << scb), max(end, (s + 1) << scb)
            pieces = [memoryview(buf)[start:end]]
        else:
            pieces = [data]
            if head:
                pieces.insert(0, self._guest_bytes(first + lo, a - lo))
            if tail:
                pieces.append(self._guest_bytes(first + b, hi - b))
        if in_place:
            self._check_overlap(first + start, target + start, end - start)
        self._pwritev(pieces, target + start)
        self.zero_from = max(self.zero_from, target + cs)
        self.alloc_end = max(self.alloc_end, target + cs)
        new_alloc = (alloc if in_place else keep) | touched
        new_zero = 0 if compressed else zero & ~touched
        # Data first, then the entry that points to it.
        words[w] = np.uint64(target | QCOW_OFLAG_COPIED)
        words[w + 1] = np.uint64((new_zero << SC_ZERO_SHIFT) | new_alloc)
        self.l2_cache.mark_dirty(slot)
        if not in_place and (host or compressed):
            self._release_entry(desc)

    def _guest_bytes(self, pos, n):
        """What the guest reads at [pos, pos+n) now (under the lock)."""
        buf = bytearray(n)
        self._read_locked(pos, memoryview(buf))
        return buf

    # -- zeroes and discard ---------------------------------------------------------

    def _set_subclusters(self, a, b, what, unmap):
        """Make the whole subclusters [a, b) read as zeros ("zero", or
        "discard" over a backing file) or become unallocated ("discard"
        without one), releasing a host cluster once none of its
        subclusters is allocated and ``unmap`` (always for discard)."""
        geo = self.geo
        cs, scb = geo.cluster_size, geo.subcluster_bits
        reads_zero = what == "zero" or self.backing is not None
        pos = a
        while pos < b:
            l1i = geo.l1_index(pos)
            span_end = min(b, (l1i + 1) * geo.bytes_per_l2())
            if self.mapping.l2_table_offset(l1i) == 0 and not reads_zero:
                pos = span_end          # already unallocated and without a backing file
                continue
            slot = self._l2_slot_for_write(pos)
            self.l2_cache.pin(slot)
            try:
                slice_end = min(span_end, (pos | (geo.slice_entries * cs - 1)) + 1)
                while pos < slice_end:
                    first = pos & ~(cs - 1)
                    stop = min(slice_end, first + cs)
                    self._set_in_cluster(slot, first, (pos - first) >> scb,
                                         ((stop - first) >> scb) - 1, reads_zero,
                                         unmap or what == "discard")
                    pos = stop
            finally:
                self.l2_cache.unpin(slot)

    def _set_in_cluster(self, slot, first, s0, s1, reads_zero, unmap):
        words, w = self._entry_words(slot, first)
        whole = s0 == 0 and s1 == SUBCLUSTERS - 1
        mask = sc_mask(s0, s1)

        def state():
            desc, bm = int(words[w]), int(words[w + 1])
            compressed = bool(desc & QCOW_OFLAG_COMPRESSED)
            host = 0 if compressed else desc & L2E_OFFSET_MASK
            return desc, bm, compressed, host, compressed or (host and not desc & QCOW_OFLAG_COPIED)

        desc, bm, compressed, host, foreign = state()
        if foreign and not whole:
            # Part of a compressed or shared cluster: copy it first (the
            # written zeros leave the other subclusters as they were).
            scb = self.geo.subcluster_bits
            self._write_in_cluster(slot, first + (s0 << scb), bytes((s1 - s0 + 1) << scb))
            desc, bm, compressed, host, foreign = state()
        if foreign:
            new_desc, alloc, zero = 0, 0, 0         # (whole) compressed or shared: let go
        else:
            new_desc = desc
            alloc = bm & SC_ALLOC_MASK & ~mask
            zero = bm >> SC_ZERO_SHIFT
        zero = zero | mask if reads_zero else zero & ~mask
        if host and not alloc and unmap:
            new_desc = 0                            # no subcluster left: free the cluster
        new_bm = (zero << SC_ZERO_SHIFT) | alloc
        if (new_desc, new_bm) != (desc, bm):
            words[w] = np.uint64(new_desc)
            words[w + 1] = np.uint64(new_bm)
            self.l2_cache.mark_dirty(slot)
            if compressed or (host and (new_desc & L2E_OFFSET_MASK) != host):
                self._release_entry(desc)
