"""The Image: open, read, write, zero, discard, flush, close (qemu's qcow2.c).

The hot paths live in the Cython base class ``ImageCore``: reads, in-place
overwrites, and allocating writes that need nothing copied.  This class
owns the image's state and does the rest (copy-on-write, backing files,
compressed clusters, new L2 tables and refcount blocks, zeroes, discard,
flush), always under the exclusive lock.

Write ordering (each barrier is an fdatasync, skipped under cache=unsafe):
1. guest data is written to newly allocated clusters;
2. refcount blocks reach the disk, barrier;
3. L2 slices reach the disk, barrier;
4. only then are clusters that L2 entries stopped using freed.
With lazy refcounts the dirty bit is set (and made stable) before the first
refcount update that step 2 would otherwise order.
"""

import os
import threading

import numpy as np

from ..spec import header as hdr
from .._ext.core import ImageCore
from .._ext.fileio import File
from .._ext.kernels import l2_entry_kind
from .backing import open_backing
from .cache import DEFAULT_CACHE_CLEAN_INTERVAL, CacheCleaner, make_caches
from .compress import decompress_cluster
from .compressed import CompressedWriteOps
from ..errors import CorruptImageError, ImageClosedError, InvalidArgumentError, ReadOnlyImageError
from ..extent import Extent, merge_extents
from ..spec.geometry import L2E_OFFSET_MASK, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, Geometry
from .mapping import (COMPRESSED, DATA, INVALID, KIND_NAMES, UNALLOCATED, ZERO, Mapping,
                      read_l1_table)
from .overlap import MetadataMap
from .refcount import Refcounts
from .snapshot import find_snapshot, read_snapshot_table
from .subcluster import SubclusterOps

CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")
MAX_HEADER_READ = 2 << 20
ZERO_FROM_NEVER = 1 << 62      # zero_from of a block device: no host byte is known to be zero


class Image(SubclusterOps, CompressedWriteOps, ImageCore):
    """An open qcow2 image.  Use :func:`qcow2fast.open` to get one."""

    def __init__(self, path, mode="r", *, cache_mode="writeback", l2_cache_size=None,
                 l2_cache_entry_size=None, refcount_cache_size=None, cache_size=None,
                 cache_clean_interval=None, lazy_refcounts=None, backing=True, snapshot=None,
                 _chain=(), _repair=False):
        if mode not in ("r", "r+"):
            raise InvalidArgumentError(f"mode must be 'r' or 'r+', not {mode!r}")
        if snapshot is not None and mode != "r":
            raise InvalidArgumentError("a snapshot can only be opened read-only (mode 'r')")
        if cache_mode not in CACHE_MODES:
            raise InvalidArgumentError(f"cache_mode must be one of {', '.join(CACHE_MODES)}")
        for name, value in (("l2_cache_size", l2_cache_size),
                            ("l2_cache_entry_size", l2_cache_entry_size),
                            ("refcount_cache_size", refcount_cache_size),
                            ("cache_size", cache_size),
                            ("cache_clean_interval", cache_clean_interval)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise InvalidArgumentError(f"{name} must be a non-negative integer, "
                                           f"not {value!r}")
        self.path = os.fspath(path)
        self.cache_mode = cache_mode
        self._lock_py = threading.Lock()     # serialises close() against the cleaner
        self._cleaner = None
        self.backing = None
        writable = mode == "r+"
        direct = cache_mode in ("none", "directsync")
        try:
            f = File(self.path, writable=writable, direct=direct)
        except OSError as e:
            if direct and e.errno == 22:
                raise InvalidArgumentError(f"{self.path}: the filesystem does not support "
                                           f"O_DIRECT (cache mode {cache_mode})") from None
            raise
        try:
            self._repair = _repair and writable     # check -r all: see Refcounts
            self._open(f, writable, l2_cache_size, l2_cache_entry_size, refcount_cache_size,
                       cache_size, cache_clean_interval, lazy_refcounts, backing, snapshot,
                       _chain)
        except BaseException:
            if self.backing is not None:
                self.backing.close()
            f.close()
            raise

    # -- opening ----------------------------------------------------------------

    def _open(self, f, writable, l2_cache_size, l2_cache_entry_size, refcount_cache_size,
              cache_size, cache_clean_interval, lazy_refcounts, backing, snapshot, chain):
        file_size = f.size()
        h = hdr.parse_header(f.pread(0, min(file_size, MAX_HEADER_READ)), file_size)
        hdr.check_features(h, writable)
        self.header = h
        self._read_only_why = None
        if h.incompatible_features & hdr.INCOMPAT_CORRUPT and writable:
            # qemu refuses to write a corrupt image; it stays readable.
            writable = False
            self._read_only_why = "image is marked corrupt (repair it with check -r all)"
        cs = h.cluster_size
        entry_size = l2_cache_entry_size or cs
        if entry_size & (entry_size - 1) or not 512 <= entry_size <= cs:
            raise InvalidArgumentError(f"l2_cache_entry_size must be a power of two between "
                                       f"512 and the cluster size ({cs})")
        self.geo = geo = Geometry(h.cluster_bits, h.refcount_order, entry_size,
                                  extended_l2=h.incompatible_features & hdr.INCOMPAT_EXTL2)
        self.file = f
        self._metadata = MetadataMap((file_size + cs - 1) // cs, self._set_metadata_bitmap)
        self._metadata.add(0)
        self.snapshots, snap_bytes = read_snapshot_table(f, h, file_size)
        self.snapshot_table_bytes = snap_bytes
        if h.nb_snapshots:
            self._metadata.add(h.snapshots_offset >> geo.cluster_bits,
                               geo.size_to_clusters(snap_bytes))
        # A snapshot is viewed read-only through its own L1 table.  Like qemu's
        # load_tmp, the view keeps the image's current virtual size.
        self.snapshot = None
        l1_offset, l1_size, size = h.l1_table_offset, h.l1_size, h.size
        if snapshot is not None:
            self.snapshot = s = find_snapshot(self.snapshots, snapshot)
            l1_offset, l1_size = s.l1_table_offset, s.l1_size
        l1 = read_l1_table(f, l1_offset, l1_size, cs, file_size,
                           what="L1 table" if snapshot is None else f"snapshot {s.id} L1 table")

        self.l2_cache, self.refcount_cache = make_caches(f, size, cs, entry_size,
                                                         l2_cache_size, refcount_cache_size,
                                                         cache_size, geo.l2_entry_bytes)
        self.mapping = Mapping(f, geo, h, l1, self.l2_cache, self._metadata)
        self.refcounts = None
        if writable:
            self.refcounts = Refcounts(f, geo, h, self.refcount_cache, self._barrier,
                                       self._metadata, file_size, repair=self._repair)
        # The lazy-refcounts open option overrides the header's bit, as in qemu.
        if lazy_refcounts and h.version < 3:
            raise InvalidArgumentError("lazy refcounts require compat=1.1 or later")
        self.lazy_refcounts = bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS) \
            if lazy_refcounts is None else bool(lazy_refcounts)
        self._unsafe = self.cache_mode == "unsafe"
        if not self.lazy_refcounts:
            self.l2_cache.depends = self.refcount_cache
            self.l2_cache.sync_dependency = not self._unsafe

        if h.backing_file and backing:
            self.backing = open_backing(self, chain)
        self._decompressed = {}              # host offset -> cluster bytes (small LRU)
        self._free_byte_offset = 0           # compressed_write: next byte to pack into
        self._core_setup(f, self.l2_cache, geo.cluster_bits, geo.slice_bits, size,
                         not writable, self.backing is not None, geo.extended_l2)
        # Host bytes at or past zero_from read as zeros: past the end of a
        # file, nowhere on a block device (it holds whatever it held).
        self.zero_from = file_size if not f.is_device else ZERO_FROM_NEVER
        self.alloc_end = file_size
        self.rc = self.refcounts
        self.writethrough = self.cache_mode in ("writethrough", "directsync")
        self._set_l1(self.mapping.l1)
        self._set_metadata_bitmap(self._metadata.bits)
        self._set_host_limit(-(-file_size // cs) * cs)
        if writable:
            if h.autoclear_features:
                # Unknown auto-clear bits must be cleared before writing.
                h.autoclear_features = 0
                self._write_header_field("autoclear_features")
            if h.incompatible_features & hdr.INCOMPAT_DIRTY:
                from ..fsck.rebuild import rebuild_refcounts
                rebuild_refcounts(self)
                self._set_dirty(False)
        self._update_alloc_fast()
        interval = DEFAULT_CACHE_CLEAN_INTERVAL if cache_clean_interval is None \
            else cache_clean_interval
        if interval and interval > 0:
            self._cleaner = CacheCleaner(self, interval)

    # -- properties ---------------------------------------------------------------

    @property
    def cluster_size(self):
        return self.geo.cluster_size

    @property
    def version(self):
        return self.header.version

    @property
    def refcount_bits(self):
        return self.header.refcount_bits

    @property
    def compression_type(self):
        return hdr.COMPRESSION_NAMES[self.header.compression_type]

    @property
    def dirty(self):
        return bool(self.header.incompatible_features & hdr.INCOMPAT_DIRTY)

    @property
    def corrupt(self):
        return bool(self.header.incompatible_features & hdr.INCOMPAT_CORRUPT)

    @property
    def backing_file(self):
        return self.header.backing_file

    @property
    def backing_format(self):
        return self.header.backing_format

    @property
    def backing_chain(self):
        chain, img = [], self
        while img is not None:
            chain.append(img.path)
            img = getattr(img, "backing", None)
        return chain

    @property
    def features(self):
        h = self.header
        out = {}
        for kind, name, bits in (("incompatible", hdr.FEATURE_INCOMPAT, h.incompatible_features),
                                 ("compatible", hdr.FEATURE_COMPAT, h.compatible_features),
                                 ("autoclear", hdr.FEATURE_AUTOCLEAR, h.autoclear_features)):
            out[kind] = [h.feature_name(name, b) for b in range(64) if bits >> b & 1]
        return out

    @property
    def cache_stats(self):
        return {"l2_hits": self.l2_cache.hits, "l2_misses": self.l2_cache.misses,
                "l2_slots": self.l2_cache.nslots, "l2_used": self.l2_cache.used,
                "refcount_hits": self.refcount_cache.hits,
                "refcount_misses": self.refcount_cache.misses,
                "refcount_used": self.refcount_cache.used}

    def __repr__(self):
        state = "closed" if self.closed else ("r" if self.read_only else "r+")
        return f"<qcow2fast.Image {self.path!r} size={self.size} {state}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- helpers --------------------------------------------------------------------

    def _barrier(self):
        """Make completed writes stable (skipped under cache=unsafe)."""
        if not self._unsafe:
            self.file.sync()

    def _flush_refcounts(self):
        self.refcount_cache.flush()

    def _write_header_field(self, name):
        self.file.pwrite(hdr.FIELD_STRUCT[name].pack(getattr(self.header, name)),
                         hdr.FIELD_OFFSET[name])

    def _set_dirty(self, dirty):
        h = self.header
        if h.version < 3:
            return
        if dirty:
            h.incompatible_features |= hdr.INCOMPAT_DIRTY
        else:
            h.incompatible_features &= ~hdr.INCOMPAT_DIRTY
        self._write_header_field("incompatible_features")
        self._barrier()
        self._update_alloc_fast()

    def _update_alloc_fast(self):
        """Allocating writes may run in C unless lazy refcounts still need
        the dirty bit set first (the Python path does that)."""
        self.alloc_fast = (not self.read_only and self.refcounts is not None
                           and (not self.lazy_refcounts or self.dirty))

    def _report_alloc_overlap(self, host):
        err = CorruptImageError(f"allocator returned host cluster {host:#x} which holds "
                                "metadata: refcounts are wrong", offset=host, field="refcount")
        self._mark_corrupt(err)
        raise err

    def _read_only_reason(self):
        return f"{self.path}: {self._read_only_why or 'image is open read-only'}"

    def _mark_corrupt(self, err):
        """Set the corrupt bit and stop writing (as qemu does)."""
        self.read_only = True
        self.alloc_fast = False
        self._read_only_why = f"image marked corrupt: {err}"
        h = self.header
        if h.version >= 3 and not h.incompatible_features & hdr.INCOMPAT_CORRUPT:
            h.incompatible_features |= hdr.INCOMPAT_CORRUPT
            try:
                self._write_header_field("incompatible_features")
                self.file.sync()
            except OSError:
                pass

    def _check_writable(self):
        if self.closed:
            raise ImageClosedError("I/O operation on a closed image")
        if self.read_only:
            raise ReadOnlyImageError(self._read_only_reason())

    def _begin_metadata_update(self):
        """Called before refcounts change: under lazy refcounts the dirty
        bit must be on disk first."""
        if self.lazy_refcounts and not self.dirty:
            self._set_dirty(True)

    def _host_limit_changed(self):
        end = self.refcounts.end_cluster << self.geo.cluster_bits
        if end > self.host_limit:
            self._set_host_limit(end)

    # -- reading (slow path) ----------------------------------------------------------

    def _read_slow(self, offset, mv):
        self._wrlock()
        try:
            self._read_locked(offset, mv)
        finally:
            self._unlock()

    def _read_locked(self, offset, mv):
        done, total = 0, len(mv)
        while done < total:
            done += self._fast_readinto_locked(offset + done, mv[done:])
            if done == total:
                break
            pos = offset + done
            kind, host, n, entry = self.mapping.run_at(pos, total - done, self.host_limit)
            out = mv[done:done + n]
            if kind == UNALLOCATED:
                self._read_backing(pos, out)
            elif kind == COMPRESSED:
                data = self._decompress(entry)
                in_cl = self.geo.offset_into_cluster(pos)
                out[:] = data[in_cl:in_cl + n]
            elif kind == ZERO:
                out[:] = bytes(n)
            else:
                self.file.preadinto(out, host)
            done += n

    def _read_backing(self, pos, out):
        n = len(out)
        b = self.backing
        if b is None or pos >= b.size:
            out[:] = bytes(n)
            return
        k = min(n, b.size - pos)
        b.readinto(pos, out[:k])
        if k < n:
            out[k:] = bytes(n - k)

    def _decompress(self, entry):
        coff, csize = self.geo.compressed_extent(entry)
        data = self._decompressed.get(coff)
        if data is None:
            raw = self.file.pread(coff, csize)
            data = decompress_cluster(raw, self.header.compression_type, self.geo.cluster_size,
                                      coff)
            if len(self._decompressed) >= 8:
                self._decompressed.pop(next(iter(self._decompressed)))
            self._decompressed[coff] = data
        return data

    # -- writing (slow path) -----------------------------------------------------------

    def _update(self, operation, *args):
        """Run a metadata-changing operation under the exclusive lock.
        Corruption found on the way marks the image corrupt (stopping
        further writes), as qemu does."""
        self._wrlock()
        try:
            self._check_writable()
            return operation(*args)
        except CorruptImageError as e:
            self._mark_corrupt(e)
            raise
        finally:
            self._unlock()

    def _write_slow(self, offset, mv):
        self._update(self._write_locked, offset, mv)

    def _write_locked(self, offset, mv):
        done, total = 0, len(mv)
        while done < total:
            pos = offset + done
            slot = self._l2_slot_for_write(pos)
            self.l2_cache.pin(slot)
            try:
                kind, host, n, entry = self.mapping.run_at(pos, total - done, self.host_limit,
                                                           need_copied=True)
                if kind == DATA and entry & QCOW_OFLAG_COPIED:
                    self._check_overlap(pos, host, n)
                    self.file.pwrite(mv[done:done + n], host)
                elif self.geo.extended_l2:
                    self._write_subclusters(slot, pos, mv[done:done + n])
                else:
                    self._allocating_write(slot, pos, mv[done:done + n])
            finally:
                self.l2_cache.unpin(slot)
            done += n

    def _l2_slot_for_write(self, pos):
        self._begin_metadata_update()
        slot = self.mapping.l2_slot_for_write(pos, self.refcounts)
        self._host_limit_changed()
        return slot

    def _check_overlap(self, pos, host, n):
        if self._touches_metadata_py(host, n):
            raise CorruptImageError(
                f"guest offset {pos:#x} maps to host offset {host:#x}, which holds metadata; "
                "writing there would destroy it", offset=self.mapping.entry_location(pos),
                field="L2 entry")

    def _allocating_write(self, slot, pos, data):
        """Write ``data`` at guest ``pos`` into newly allocated clusters,
        copying the untouched parts of the first and last cluster from what
        the guest saw before (backing file, compressed or shared cluster)."""
        geo = self.geo
        cs = geo.cluster_size
        first = geo.start_of_cluster(pos)
        nclusters = geo.size_to_clusters(pos + len(data) - first)
        head = pos - first
        tail = nclusters * cs - head - len(data)
        l2 = self.l2_cache.u64(slot)
        i0 = geo.l2_index(first) & (geo.slice_entries - 1)
        old = [int(e) for e in l2[i0:i0 + nclusters]]
        new = self.refcounts.alloc(nclusters)
        self._host_limit_changed()
        if self._touches_metadata_py(new, nclusters * cs):
            self._report_alloc_overlap(new)
        fresh = new >= self.zero_from
        pieces = []
        if head:
            pieces.append(self._old_bytes(first, 0, head, old[0], fresh))
        pieces.append(data)
        if tail:
            pieces.append(self._old_bytes(first + (nclusters - 1) * cs, cs - tail, tail, old[-1],
                                          fresh))
        # Drop leading/trailing pieces that are zeros over fresh (zero) space.
        start = new
        if pieces[0] is None:
            pieces.pop(0)
            start += head
        if pieces[-1] is None:
            pieces.pop()
        self._pwritev(pieces, start)
        end = new + nclusters * cs
        self.zero_from = max(self.zero_from, end)
        self.alloc_end = max(self.alloc_end, end)
        # Data first, then the L2 entries that point to it.
        for k in range(nclusters):
            l2[i0 + k] = np.uint64((new + k * cs) | QCOW_OFLAG_COPIED)
        self.l2_cache.mark_dirty(slot, 8 * i0, 8 * (i0 + nclusters))
        for e in old:
            self._release_entry(e)

    def _old_bytes(self, guest_cluster, start, n, entry, fresh):
        """What the guest read at [guest_cluster+start, +n) before this write,
        or None if it is zeros and the target is fresh (already zero)."""
        kind = l2_entry_kind(entry)
        if kind == ZERO or (kind == UNALLOCATED and self.backing is None):
            return None if fresh else bytes(n)
        buf = bytearray(n)
        if kind == UNALLOCATED:
            self._read_backing(guest_cluster + start, memoryview(buf))
        elif kind == COMPRESSED:
            buf[:] = self._decompress(entry)[start:start + n]
        else:   # a data cluster shared with a snapshot
            self.file.preadinto(buf, (entry & L2E_OFFSET_MASK) + start)
        if fresh and not any(buf):
            return None
        return buf

    def _pwritev(self, pieces, off):
        if len(pieces) == 1 or self.file.direct:
            self.file.pwrite(b"".join(pieces) if len(pieces) > 1 else pieces[0], off)
            return
        views = [memoryview(p).cast("B") for p in pieces]
        while views:
            n = os.pwritev(self.file.fd, views, off)
            off += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    def _release_entry(self, entry):
        """Drop the reference an L2 entry held (deferred, see module doc)."""
        kind = l2_entry_kind(entry)
        rc = self.refcounts
        if kind == COMPRESSED:
            first, last = self.geo.compressed_clusters(entry)
            rc.free_deferred(first << self.geo.cluster_bits, last - first + 1)
        elif kind in (DATA, ZERO) and entry & L2E_OFFSET_MASK:
            rc.free_deferred(entry & L2E_OFFSET_MASK, 1)

    # -- zeroes and discard -------------------------------------------------------------

    def write_zeroes(self, offset, length, *, may_unmap=False):
        """Make [offset, offset+length) read as zeros, without writing data
        where the format allows (v3 zero flag; v2 without a backing file
        deallocates)."""
        self._check_range_py(offset, length)
        self._update(self._zero_locked, offset, length, may_unmap)
        if self.writethrough:
            self.flush()

    def _whole_units(self, offset, end):
        """[a, b): the whole allocation units (clusters, or subclusters with
        extended L2 entries) inside [offset, end).  The last one of the disk
        counts as whole when the range reaches the disk's end."""
        cs = self.geo.subcluster_size
        a = -(-offset // cs) * cs
        b = -(-end // cs) * cs if end == self.size else end - end % cs
        return a, max(a, b)

    def _zero_locked(self, offset, length, may_unmap):
        end = offset + length
        a, b = self._whole_units(offset, end)
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
        if self.header.version < 3 and (self.backing is not None or not may_unmap):
            # v2 has no zero flag: write zeros where the clusters do not
            # already read as zeros (deallocating needs may_unmap and no
            # backing file).
            for ext in list(self._layer_extents(a, min(b, self.size) - a)):
                if ext.kind == "unallocated" and self.backing is None:
                    continue
                self._write_zero_bytes(ext.offset, ext.length)
            return
        self._set_entries(a, b, "zero", may_unmap or self.header.version < 3)

    def _write_zero_bytes(self, offset, length):
        chunk = 1 << 20
        zeros = memoryview(bytes(min(chunk, length)))
        for pos in range(offset, offset + length, chunk):
            self._write_locked(pos, zeros[:min(chunk, offset + length - pos)])

    def discard(self, offset, length):
        """Discard whole clusters in [offset, offset+length): their host space
        is freed.  Afterwards they read as zeros (v3, or v2 without a backing
        file) or from the backing file (v2 with one)."""
        self._check_range_py(offset, length)
        a, b = self._whole_units(offset, offset + length)
        if b <= a:
            return
        if b >= self.size:      # the last cluster whole, subclusters past the end too (qemu)
            b = self.geo.size_to_clusters(self.size) << self.geo.cluster_bits
        self._update(self._set_entries, a, b, "discard", True)
        if self.writethrough:
            self.flush()

    def _set_entries(self, a, b, what, unmap):
        """Rewrite the L2 entries of whole clusters [a, b) to read as zeros
        (or, v2 / no backing, to be unallocated), releasing host clusters
        when ``unmap``."""
        if self.geo.extended_l2:
            return self._set_subclusters(a, b, what, unmap)
        geo = self.geo
        v3 = self.header.version >= 3
        pos = a
        while pos < b:
            l1i = geo.l1_index(pos)
            span = min(b, (l1i + 1) * geo.bytes_per_l2()) - pos
            if self.mapping.l2_table_offset(l1i) == 0 and (self.backing is None or not v3):
                pos += span         # whole L2 range unallocated: already zero
                continue
            slot = self._l2_slot_for_write(pos)
            self.l2_cache.pin(slot)
            try:
                l2 = self.l2_cache.u64(slot)
                i0 = geo.l2_index(pos) & (geo.slice_entries - 1)
                n = min(geo.slice_entries - i0, (b - pos) >> geo.cluster_bits)
                for k in range(n):
                    e = int(l2[i0 + k])
                    kind = l2_entry_kind(e)
                    if kind == INVALID:
                        raise CorruptImageError(f"invalid L2 entry {e:#x}",
                                                offset=self.l2_cache.key(slot) + 8 * (i0 + k),
                                                field="L2 entry")
                    if v3 and (self.backing is not None or what == "zero"):
                        keep = (not unmap and kind in (DATA, ZERO) and e & QCOW_OFLAG_COPIED
                                and e & L2E_OFFSET_MASK)
                        new = (e & L2E_OFFSET_MASK) | QCOW_OFLAG_COPIED | QCOW_OFLAG_ZERO \
                            if keep else QCOW_OFLAG_ZERO
                    else:
                        keep, new = False, 0
                    if new != e:
                        l2[i0 + k] = np.uint64(new)
                        if not keep:
                            self._release_entry(e)
                self.l2_cache.mark_dirty(slot)
            finally:
                self.l2_cache.unpin(slot)
            pos += n << geo.cluster_bits

    def _reads_as_zero(self, offset, length):
        for ext in self._layer_extents(offset, length):
            if ext.kind not in ("zero", "unallocated") or (ext.kind == "unallocated"
                                                          and self.backing is not None):
                return False
        return True

    def _check_range_py(self, offset, length):
        if self.closed:
            raise ImageClosedError("I/O operation on a closed image")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgumentError(
                f"request [{offset}, {offset + length}) outside the image (size {self.size})")

    # -- block status ---------------------------------------------------------------------

    def _layer_extents(self, offset, length):
        pos, end = offset, offset + length
        while pos < end:
            kind, host, n, entry = self.mapping.run_at(pos, end - pos, self.host_limit)
            if not host:        # (zero or unallocated: a preallocated cluster keeps it)
                host = None
            yield Extent(pos, n, KIND_NAMES[kind], host, 0)
            pos += n

    def block_status(self, offset=0, length=None):
        """Extents of [offset, offset+length) through the whole backing chain."""
        if length is None:
            length = self.size - offset
        self._check_range_py(offset, length)
        self._wrlock()
        try:
            exts = list(self._layer_extents(offset, length))
        finally:
            self._unlock()
        out = []
        for e in exts:
            b = self.backing
            if e.kind != "unallocated" or b is None:
                out.append(e)          # an unallocated extent's depth: the deepest
                continue               # layer consulted (0 here), as qemu reports
            lim = min(e.offset + e.length, b.size)
            if lim > e.offset:
                for sub in b.block_status(e.offset, lim - e.offset):
                    out.append(sub._replace(depth=sub.depth + 1))
            if lim < e.offset + e.length:
                # Past the end of the backing file: reads as zeros, found here.
                start = max(lim, e.offset)
                out.append(Extent(start, e.offset + e.length - start, "unallocated", None, 0))
        return merge_extents(out)

    # -- flush and close --------------------------------------------------------------------

    def flush(self):
        """Make every completed write durable (per the cache mode)."""
        if self.closed:
            raise ImageClosedError("flush of a closed image")
        if self.read_only or self._unsafe:
            return
        self._wrlock()
        try:
            self._flush_locked(sync=True)
        finally:
            self._unlock()

    def _flush_locked(self, sync, final=False):
        if self.refcounts is None:
            return
        if not self.lazy_refcounts or final:
            self.refcount_cache.flush()
            if sync:
                self.file.sync()    # barrier: refcounts before the L2 entries using them
        self.l2_cache.flush()
        if self.alloc_end > self.file.size():
            self.file.truncate(self.alloc_end)
        if sync:
            self.file.sync()        # barrier: L2 tables on disk before L1 entries point to them
        if self.mapping.write_pending_l1() and sync:
            self.file.sync()        # barrier: L1 entries on disk before old L2 tables are freed
        if self.refcounts.deferred:
            self._decompressed.clear()      # freed host space may be reused
            self._free_byte_offset = 0
            self.refcounts.apply_deferred_frees(self._discard_host)
            if not self.lazy_refcounts or final:
                self.refcount_cache.flush()
                if sync:
                    self.file.sync()

    def _discard_host(self, offset, n):
        self.file.punch_hole(offset, n << self.geo.cluster_bits)

    def close(self):
        """Flush (without syncing under cache=unsafe), clear the dirty bit, and
        close the image and its backing chain."""
        with self._lock_py:
            if self.closed:
                return
            if self._cleaner is not None:
                self._cleaner.stop()
                self._cleaner = None
            self._wrlock()
            try:
                if self.refcounts is not None and not self.read_only:
                    # Under cache=unsafe nothing is synced, not even here (qemu).
                    self._flush_locked(sync=not self._unsafe, final=True)
                    if self.dirty:
                        self._set_dirty(False)
                self.closed = True
            finally:
                self._unlock()
                self.file.close()
                if self.backing is not None:
                    self.backing.close()

    def __del__(self):
        try:
            if not self.closed:
                self.close()
        except Exception:
            pass

    def as_file(self):
        """A seekable io.RawIOBase view of the guest disk."""
        from .rawio import ImageFile
        if self.closed:
            raise ImageClosedError("as_file() on a closed image")
        return ImageFile(self)
