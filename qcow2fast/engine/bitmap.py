"""Persistent dirty bitmaps: the bitmaps extension of an open image
(qemu's qcow2-bitmap.c; layouts in spec/bitmaps.py).

At open the directory is read (never the bitmap data: that is loaded when
first needed).  With the image open for writing, as qemu does:

- every bitmap that is consistent on disk is marked ``in_use`` in place
  (autoclear bit cleared, barrier, directory rewritten, barrier, autoclear
  bit set, barrier), so a crash leaves it inconsistent, never stale;
- every enabled (``auto``) bitmap gets a ``DirtyBitmap`` write observer:
  the data path, the C fast path included, sets its bits before data moves.
  It starts empty; the data on disk is ORed in when first needed (bits are
  only ever set, so the order does not matter);
- a bitmap found ``in_use`` at open is inconsistent: kept as it is on disk,
  usable only to be removed.

At close (:meth:`Bitmaps.store`) every consistent bitmap is written to new
clusters and the directory replaced, as qemu does (so the clusters land
where qemu's land); a removed bitmap leaves the image at once, as in qemu; the order and its barriers are stated
there.  An image whose bitmaps autoclear bit was cleared by a program
that does not know bitmaps has its bitmaps ignored, and the extension is
dropped at the next open for writing (qemu's behaviour).
"""

from __future__ import annotations

from .._numpy import np

from .._ext.hooks import DirtyBitmap
from ..errors import (CorruptImageError, InvalidArgumentError, ReadOnlyImageError,
                      UnsupportedFeatureError)
from ..spec import bitmaps as bm
from ..spec import header as hdr
from . import features
from .bitmap_list import (read_directory, read_extension, read_extension_any, read_table,
                          read_tables, stale_warning, table_error)
from .bitmap_store import free_bitmaps, write_bitmaps

class Bitmap:
    """A persistent dirty bitmap of an open image."""

    def __init__(self, entry, size, loaded):
        self.entry = entry                  # its directory entry (flags as at open)
        self.name = entry.name
        self.granularity = entry.granularity
        # in_use when the image was opened: its data cannot be trusted
        self.inconsistent = entry.in_use
        self.enabled = entry.auto
        self.tracker = None if self.inconsistent else DirtyBitmap(size, self.granularity)
        self.loaded = loaded                # the data on disk is in ``tracker``
        self.on_disk = entry.table_offset != 0

    @property
    def flags(self):
        """qemu-img info's flags: as in the directory on disk now."""
        return self.entry.flag_names()

    def __repr__(self):
        return (f"<Bitmap {self.name!r} granularity={self.granularity} "
                f"{'enabled' if self.enabled else 'disabled'}"
                f"{' inconsistent' if self.inconsistent else ''}>")


class Bitmaps:
    """The bitmaps of one open image, given its state, the allocator
    (``refcounts``, None when read-only) and the image (its write
    observers)."""

    def __init__(self, state, refcounts, image):
        self.state, self.refcounts, self.image = state, refcounts, image
        self.error = None               # why the directory cannot be used
        self.stale = False              # extension present, autoclear bit cleared
        self.list = []
        self.changed = False            # something to store at close
        h = state.header
        self.warning = stale_warning(h)     # qemu's warning when they were disowned
        try:
            _, self.stale = read_extension(h)
            entries = read_directory(state.file, h, state.size)
        except CorruptImageError as e:
            self.error = e
            entries = []
        self.list = [Bitmap(e, state.size, loaded=False) for e in entries]
        self.by_name = {b.name: b for b in self.list}
        self.dir_size = sum(bm.entry_size(len(b.name.encode())) for b in self.list)

    # -- opening for writing ----------------------------------------------------

    def open_rw(self):
        """Open for writing: drop a stale extension, mark the consistent
        bitmaps in use on disk, start tracking writes into the enabled ones."""
        s = self.state
        if self.error is not None:
            raise CorruptImageError(f"cannot write an image whose bitmaps are broken: "
                                    f"{self.error}") from self.error
        if self.stale:
            # qemu: the bitmaps are lost; the extension goes (their clusters leak)
            self._set_extension(None)
            self._write_header()
            s.barrier()
            self.stale = False
        marked = [b for b in self.list if not b.inconsistent]
        self._check_placements([b.entry for b in marked])
        for b in self.list:
            if b.enabled and b.tracker is not None:
                self.image.add_write_observer(b.tracker)
        if marked:
            for b in marked:
                b.entry.flags |= bm.BME_FLAG_IN_USE
            self._rewrite_directory_in_place()
            self.changed = True

    def _check_placements(self, entries):
        """Before anything is written: each bitmap's table and data lie in
        the file, apart from the header, L1 and refcount structures and
        from the bitmaps before it; then they join the metadata map.  All
        bitmaps in one numpy pass (65535 of them); the first problem, in
        the directory's order, is raised."""
        s, cs, cb = self.state, self.state.cluster_size, self.state.cluster_bits
        if not entries:
            return
        tables, starts, bad = read_tables(s.file, entries, cs)
        if bad is not None:         # the bitmaps before it are checked first
            self._check_placements(entries[:bad])
            raise table_error(s.file, entries[bad], cs)
        n = len(entries)
        # Spans: each table (rank 0), then its data clusters (rank 1 + index).
        offs = bm.table_offsets(tables).astype(np.int64)
        data = np.flatnonzero(offs)
        owner_of = np.repeat(np.arange(n), np.diff(starts))[data]
        table_off = np.array([e.table_offset for e in entries], dtype=np.int64)
        off = np.concatenate([table_off, offs[data]])
        size = np.concatenate([[e.table_size * bm.TABLE_ENTRY_SIZE for e in entries],
                               np.full(len(data), cs)]).astype(np.int64)
        owner = np.concatenate([np.arange(n), owner_of])
        index = data - starts[owner_of]
        rank = np.concatenate([np.zeros(n, dtype=np.int64), 1 + index])
        where = np.concatenate([[e.entry_offset for e in entries], table_off[owner_of] + 8 * index])
        # Every cluster of every span.
        first = off >> cb
        count = np.maximum(((off + size - 1) >> cb) - first + 1, 0)
        span_of = np.repeat(np.arange(len(off)), count)
        clusters = first[span_of] + np.arange(len(span_of)) - np.repeat(np.cumsum(count) - count,
                                                                        count)
        meta = np.frombuffer(s.metadata.bits, np.uint8)
        inside = (clusters >> 3) < len(meta)
        hit = np.zeros(len(clusters), dtype=bool)
        hit[inside] = (meta[clusters[inside] >> 3] >> (clusters[inside] & 7).astype(np.uint8)) & 1
        # ... or of a bitmap before it (its clusters joined the map first)
        by_cluster = np.lexsort((owner[span_of], clusters))
        sc, so = clusters[by_cluster], owner[span_of][by_cluster]
        new_cluster = np.ones(len(sc), dtype=bool)
        new_cluster[1:] = sc[1:] != sc[:-1]
        first_owner = np.maximum.accumulate(np.where(new_cluster, np.arange(len(sc)), 0))
        hit[by_cluster] |= so > so[first_owner]
        overlap = np.zeros(len(off), dtype=bool)
        np.logical_or.at(overlap, span_of, hit)
        h = s.header
        l1, l1_end = h.l1_table_offset, h.l1_table_offset + h.l1_size * 8
        overlap |= (off < l1_end) & (l1 < off + size)
        past = off + size > s.file.size()
        wrong = np.flatnonzero(past | overlap)
        if len(wrong):
            i = wrong[np.lexsort((rank[wrong], owner[wrong]))[0]]
            o, n_ = int(off[i]), int(size[i])
            why = (f"[{o:#x}, {o + n_:#x}) lies past the end of the file ({s.file.size()} bytes)"
                   if past[i] else f"[{o:#x}, {o + n_:#x}) overlaps other metadata")
            raise CorruptImageError(f"bitmap '{entries[owner[i]].name}': {why}",
                                    offset=int(where[i]),
                                    field="bitmap table entry" if rank[i] else
                                    "bitmap_table_offset")
        s.metadata.add_each(clusters)

    def _rewrite_directory_in_place(self):
        """qemu's update_ext_header_and_dir_in_place: with the autoclear bit
        cleared while the directory changes, a torn directory write leaves
        the bitmaps ignored, never wrong."""
        s, h = self.state, self.state.header
        ext, _ = read_extension_any(h)
        raw = bm.pack_directory([b.entry for b in self.list])
        if len(raw) != ext.directory_size:      # a name that was not UTF-8, say
            raise CorruptImageError(f"the bitmap directory repacks to {len(raw)} bytes, not "
                                    f"{ext.directory_size}: not rewritten in place",
                                    offset=ext.directory_offset, field="bitmap directory")
        h.autoclear_features &= ~hdr.AUTOCLEAR_BITMAPS
        self._write_autoclear()
        s.barrier()                 # barrier: bitmaps disowned before the directory changes
        s.file.pwrite(raw, ext.directory_offset)
        s.barrier()                 # barrier: the directory is whole before it is owned again
        h.autoclear_features |= hdr.AUTOCLEAR_BITMAPS
        self._write_autoclear()
        s.barrier()

    def _write_autoclear(self):
        from .features import write_header_field
        write_header_field(self.state, "autoclear_features")

    def _write_header(self):
        """Rewrite the header cluster's header and extensions."""
        s = self.state
        raw = s.header.pack()
        s.file.pwrite(raw, 0)

    def _set_extension(self, ext):
        h = self.state.header
        h.other_extensions = [e for e in h.other_extensions if e.type != hdr.EXT_BITMAPS]
        if ext is None:
            h.autoclear_features &= ~hdr.AUTOCLEAR_BITMAPS
        else:
            h.other_extensions.append(hdr.HeaderExtension(hdr.EXT_BITMAPS, ext.pack()))
            h.autoclear_features |= hdr.AUTOCLEAR_BITMAPS

    # -- queries ----------------------------------------------------------------

    def _usable(self):
        if self.error is not None:
            raise self.error
        return self.list

    def get(self, name):
        self._usable()
        b = self.by_name.get(name)
        if b is None:
            raise InvalidArgumentError(f"Dirty bitmap '{name}' not found")
        return b

    def _consistent(self, name):
        b = self.get(name)
        if b.inconsistent:
            raise InvalidArgumentError(f"Bitmap '{name}' is inconsistent and cannot be used\n"
                                       "Try block-dirty-bitmap-remove to delete this bitmap "
                                       "from disk")
        return b

    def data(self, b):
        """The bitmap's tracker with its on-disk data loaded."""
        if not b.loaded:
            self._load(b)
        return b.tracker

    def _load(self, b):
        """OR the bitmap's data on disk into its tracker (which may hold
        writes tracked since open)."""
        s = self.state
        cs = s.cluster_size
        e = b.entry
        table = read_table(s.file, e, cs)
        nbytes = len(b.tracker.bits)
        want = -(-nbytes // cs)
        if len(table) < want:
            raise CorruptImageError(f"bitmap '{b.name}': table of {len(table)} entries is too "
                                    f"small for {nbytes} bytes of data",
                                    offset=e.entry_offset + 8, field="bitmap_table_size")
        offs = bm.table_offsets(table)[:want]
        ones = (offs == 0) & ((table[:want] & np.uint64(bm.BME_TABLE_ENTRY_FLAG_ALL_ONES)) != 0)
        data = np.zeros(nbytes, dtype=np.uint8)
        file_size = s.file.size()
        for i in (np.flatnonzero(ones) if ones.any() else ()):
            data[int(i) * cs:(int(i) + 1) * cs] = 0xFF
        for i in (np.flatnonzero(offs) if offs.any() else ()):
            i = int(i)
            off = int(offs[i])
            if off + cs > file_size:
                raise CorruptImageError(f"bitmap '{b.name}': data cluster {i} at {off:#x} lies "
                                        "past the end of the file",
                                        offset=e.table_offset + 8 * i, field="bitmap table entry")
            n = min(cs, nbytes - i * cs)
            data[i * cs:i * cs + n] = np.frombuffer(s.file.pread(off, n), dtype=np.uint8)
        b.tracker.merge(data)
        b.loaded = True

    def tracker(self, name):
        """The DirtyBitmap of consistent bitmap ``name``, its data on disk
        loaded: live, the enabled ones marked by every write (NBD asks for
        it per BLOCK_STATUS request: the usual case is one lookup)."""
        b = self.by_name.get(name)
        if b is not None and b.loaded and not b.inconsistent:
            return b.tracker
        return self.data(self._consistent(name))

    def dirty_extents(self, name, offset=0, length=None):
        """[(offset, length, dirty)] covering [offset, offset+length) of the
        guest disk, alternating, clipped to the disk."""
        b = self._consistent(name)
        t = self.data(b)
        size = self.state.size
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise InvalidArgumentError(f"range [{offset}, {offset + length}) is outside the "
                                       f"disk (size {size})")
        return t.runs(offset, length)

    # -- changes ---------------------------------------------------------------------

    def _writable(self):
        if self.refcounts is None or self.state.read_only:
            raise ReadOnlyImageError("bitmaps can only be changed in an image open for "
                                     "writing")
        self._usable()

    def add(self, name, granularity=65536, disabled=False):
        self._writable()
        s = self.state
        if s.header.version < 3:
            raise UnsupportedFeatureError(f"Can't make bitmap '{name}' persistent in "
                                          f"'{s.path}': Cannot store dirty bitmaps in qcow2 "
                                          "v2 files", feature="bitmaps")
        if name in self.by_name:
            raise InvalidArgumentError(f"Bitmap already exists: {name}")
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError("Bitmap name cannot be empty")
        bm.check_granularity(granularity)
        try:
            bm.check_new_bitmap(name, granularity, s.size, s.cluster_size)
            if len(self.list) + 1 > bm.MAX_BITMAPS:
                raise InvalidArgumentError("Maximum number of persistent bitmaps is already "
                                           "reached")
            if self.dir_size + bm.entry_size(len(name.encode())) > bm.MAX_DIRECTORY_SIZE:
                raise InvalidArgumentError("Not enough space in the bitmap directory")
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"Can't make bitmap '{name}' persistent in "
                                       f"'{s.path}': {e}") from None
        entry = bm.BitmapEntry(name, granularity.bit_length() - 1,
                               0 if disabled else bm.BME_FLAG_AUTO)
        b = Bitmap(entry, s.size, loaded=True)
        self.list.append(b)
        self.by_name[name] = b
        self.dir_size += bm.entry_size(len(name.encode()))
        if b.enabled:
            self.image.add_write_observer(b.tracker)
        self.changed = True
        return b

    def remove(self, name):
        self._writable()
        b = self.get(name)
        if b.tracker is not None and b.enabled:
            self.image.remove_write_observer(b.tracker)
        self.list.remove(b)
        del self.by_name[name]
        self.dir_size -= bm.entry_size(len(name.encode()))
        if b.on_disk and self.refcounts is not None:
            # qemu removes it from the image at once: a new directory
            # without it, then its table and data freed.
            s = self.state
            with features.steps(s, f"removing the persistent dirty bitmap '{name}'"):
                self._replace_directory([x.entry for x in self.list if x.on_disk])
                free_bitmaps(s, self.refcounts, [b.entry])
                s.refcount_cache.flush()
                s.barrier()     # barrier: the frees are stable
        self.changed = True

    def clear(self, name):
        self._writable()
        b = self._consistent(name)
        b.tracker.clear()
        b.loaded = True
        self.changed = True

    def enable(self, name, on=True):
        self._writable()
        b = self._consistent(name)
        if b.enabled != on:
            (self.image.add_write_observer if on else self.image.remove_write_observer)(
                b.tracker)
            b.enabled = on
        self.changed = True

    def merge(self, source, target, source_bitmaps=None):
        """target |= source (``source_bitmaps``: another image's Bitmaps)."""
        self._writable()
        t = self._consistent(target)
        src_set = source_bitmaps if source_bitmaps is not None else self
        src = src_set.data(src_set._consistent(source))
        dst = self.data(t)
        if src.size != dst.size and source_bitmaps is not None:
            raise InvalidArgumentError(f"Bitmaps are of different sizes (destination size "
                                       f"is {dst.size}, source size is {src.size}) and can "
                                       "not be merged")
        _merge_into(dst, src)
        self.changed = True

    # -- resizing the disk (engine/resize.py) ----------------------------------------

    def check_resize(self):
        """Before a resize writes anything (qemu's qcow2_truncate_bitmaps_check):
        an inconsistent bitmap stops it, with qemu's message; every other
        bitmap's data on disk, sized for the old disk, is loaded."""
        for b in self._usable():
            self._consistent(b.name)
        for b in self.list:
            self.data(b)

    def resize(self, size):
        """The disk is now ``size`` bytes (qemu's bdrv_dirty_bitmap_truncate):
        every bitmap keeps its bits up to the smaller size, the new area
        clean; the trackers are resized in place, so the enabled ones go on
        marking writes, past the old end too.  Stored at close with tables
        for the new size."""
        for b in self.list:
            self.data(b).resize(size)
            self.changed = True

    # -- storing -----------------------------------------------------------------------

    def store(self):
        """Write every consistent bitmap and a new directory (qemu's
        qcow2_store_persistent_dirty_bitmaps).  The order:

        1. each bitmap's data clusters, then its table, to new clusters
           (many bitmaps in one run of clusters, engine/bitmap_store.py);
           each cluster first-fit as qemu's allocations place them;
           refcounts written, barrier: all of it is stable before anything
           points to it (every consistent bitmap, changed or not, as qemu);
        2. the new directory to new clusters, barrier;
        3. the header (extension pointing at the new directory, autoclear
           bit set), barrier: from here the new bitmaps are the image's,
           with ``in_use`` clear;
        4. the old directory, tables and data are freed (a crash before
           leaks them, never loses a bitmap).
        """
        if not self.changed or self.refcounts is None or self.state.read_only:
            return
        with features.steps(self.state, "storing the persistent dirty bitmaps"):
            self._store()

    def _store(self):
        s, rc = self.state, self.refcounts
        old = []
        new_entries, writes = [], []
        for b in self.list:
            if b.inconsistent:
                new_entries.append(b.entry)         # kept as found (qemu)
                continue
            e = bm.BitmapEntry(b.name, b.entry.granularity_bits,
                               bm.BME_FLAG_AUTO if b.enabled else 0)
            t = self.data(b)
            if b.on_disk:
                old.append(bm.BitmapEntry(b.name, b.entry.granularity_bits, b.entry.flags,
                                          b.entry.table_offset, b.entry.table_size))
            writes.append((e, t))
            new_entries.append(e)
        write_bitmaps(s, rc, writes)
        self._replace_directory(new_entries)
        free_bitmaps(s, rc, old)
        s.refcount_cache.flush()
        s.barrier()             # barrier: the frees are stable
        for b, e in zip([b for b in self.list], new_entries):
            if not b.inconsistent:
                b.entry, b.on_disk = e, True
        self.changed = False

    def checkpoint(self):
        """:meth:`store` now, then the stored bitmaps marked in use again in
        place (as at open), so they go on tracking writes.  The caller holds
        the exclusive lock throughout: no write lands between the two."""
        self.store()
        marked = [b for b in self.list if not b.inconsistent]
        if marked and self.refcounts is not None and not self.state.read_only:
            for b in marked:
                b.entry.flags |= bm.BME_FLAG_IN_USE
            self._rewrite_directory_in_place()
            self.changed = True

    def _replace_directory(self, entries):
        """qemu's update_ext_header_and_dir: ``entries`` as a directory in
        new clusters (none when empty), the header pointing at it, then the
        old directory freed."""
        s, rc = self.state, self.refcounts
        cs = s.cluster_size
        ext_old, _ = read_extension_any(s.header)
        if entries:
            d = bm.pack_directory(entries)
            d_off = rc.alloc(-(-len(d) // cs))
            s.refcount_cache.flush()
            s.file.pwrite(d, d_off)
            s.allocated(d_off + len(d))
            s.barrier()         # barrier: what it points to, the directory and their refcounts stable
            ext = bm.BitmapsExtension(len(entries), len(d), d_off)
        else:
            ext = None
        self._set_extension(ext)
        self._write_header()
        s.barrier()             # barrier: the header points at the new directory
        if ext_old is not None and ext_old.directory_size:
            rc.free(ext_old.directory_offset, -(-ext_old.directory_size // cs))


def _merge_into(dst, src):
    """dst |= src, granularities converted (a coarser granule is dirty when
    any finer one inside it is)."""
    if src.granularity == dst.granularity and len(src.bits) == len(dst.bits):
        dst.merge(src.bits)
        return
    for off, n in src.dirty_ranges():
        dst.notify(off, n)
