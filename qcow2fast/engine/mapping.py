"""Guest-to-host cluster mapping: the L1 table and L2 tables (qemu's
qcow2-cluster.c).

Invariants:
- the active L1 table is held in memory (native byte order); an entry that
  points to a newly allocated L2 table is written at the next flush, after
  the refcounts and the L2 table are on disk (``l1_pending`` holds what is
  on disk for it until then), so allocating an L2 table costs no barrier
  between flushes (qemu syncs twice there);
- an L1 entry carries QCOW_OFLAG_COPIED exactly when its L2 table has
  refcount 1; a table without it is shared with a snapshot and is copied
  before it is modified;
- raw entries never leave this module and the kernels: callers get typed
  runs (kind, host offset, length).
"""

from array import array

from .._ext import kernels
from ..errors import CorruptImageError
from ..spec.constants import (COMPRESSED, DATA, INVALID, L1E_OFFSET_MASK, L1E_RESERVED_MASK,
                              L1E_SIZE, QCOW_OFLAG_COPIED, UNALLOCATED)
from ..spec.constants import BE64 as _BE64
from ..spec.header import pack_fields
from ..spec.tables import decode_table, encode_table

# run_at's host_limit for reports (block status): data clusters may lie past
# the file's end (qemu maps them; reading them is refused).
NO_HOST_LIMIT = 1 << 63


def read_l1_table(file, offset, size, cluster_size, file_size, what="L1 table",
                  past_eof_zeros=False):
    """Read and validate an L1 table; returns it as a native ``array('Q')``.
    ``past_eof_zeros``: what lies past the end of the file reads as zeros
    (as qemu's file driver pads such reads), else the caller has checked
    that the table is inside the file."""
    n = size * L1E_SIZE
    if past_eof_zeros and offset + n > file_size:
        raw = (file.pread(offset, file_size - offset) if offset < file_size else b"").ljust(n, b"\0")
    else:
        raw = file.pread(offset, n)
    l1 = decode_table(raw)
    i = kernels.table_first_with(l1, (L1E_RESERVED_MASK & ~QCOW_OFLAG_COPIED)
                                 | (L1E_OFFSET_MASK & (cluster_size - 1)))
    if i >= 0:
        raise CorruptImageError(f"{what} entry {i} ({l1[i]:#x}) has reserved bits set or an "
                                "unaligned L2 table offset", offset=offset + 8 * i, field="L1 entry")
    i = kernels.table_first_past(l1, L1E_OFFSET_MASK, cluster_size, file_size)
    if i >= 0:
        raise CorruptImageError(f"{what} entry {i} points to an L2 table at "
                                f"{l1[i] & L1E_OFFSET_MASK:#x}, past the end of the file "
                                f"({file_size} bytes)", offset=offset + 8 * i, field="L1 entry")
    return l1


class Mapping:
    """The image's L1 table (its one owner) and its L2 tables, given the
    image's state.  ``l1`` is the L1 table the image reads through: the
    active one, or a snapshot's for a read-only view of it."""

    def __init__(self, state, l1):
        self.state = state
        self.file = state.file
        self.geo = geo = state.geo
        self.header = header = state.header
        self.l2_cache = state.l2_cache
        self.metadata = metadata_map = state.metadata
        self.l1 = l1
        state.set_l1(l1)
        self.l1_pending = {}        # L1 index -> the entry on disk, until flushed
        cb = geo.cluster_bits
        metadata_map.add_table(l1, L1E_OFFSET_MASK, cb)
        if header.l1_size:
            metadata_map.add(header.l1_table_offset >> cb, geo.size_to_clusters(header.l1_size * L1E_SIZE))

    # -- lookups ---------------------------------------------------------------

    def l2_table_offset(self, l1_index):
        if l1_index >= len(self.l1):
            return 0
        return int(self.l1[l1_index]) & L1E_OFFSET_MASK

    def entry_location(self, offset):
        """File offset of the L2 entry mapping guest ``offset`` (0 if none)."""
        l2off = self.l2_table_offset(self.geo.l1_index(offset))
        return l2off + self.geo.l2_entry_bytes * self.geo.l2_index(offset) if l2off else 0

    def slice_key(self, l2_offset, l2_index):
        return l2_offset + (l2_index >> self.geo.slice_bits) * self.geo.slice_bytes

    def run_at(self, offset, length, host_limit, need_copied=False):
        """The first run of this layer's mapping at guest ``offset``:
        (kind, host offset of ``offset`` or 0, bytes, raw entry).  At most
        ``length`` bytes and never crossing an L2 slice.  Runs are made of
        allocation units: clusters, or subclusters with extended L2 entries
        (``entry`` is then the descriptor word of the first one's cluster)."""
        geo = self.geo
        ub = geo.unit_bits
        in_u = offset & ((1 << ub) - 1)
        l1i, l2i = geo.l1_index(offset), geo.l2_index(offset)
        l2off = self.l2_table_offset(l1i)
        if l2off == 0:
            n = min(length, ((l1i + 1) << (geo.cluster_bits + geo.l2_bits)) - offset)
            return UNALLOCATED, 0, n, 0
        slot = self.l2_cache.load(self.slice_key(l2off, l2i))
        l2 = self.l2_cache.u64(slot)
        i = l2i & (geo.slice_entries - 1)
        per = 1 << (geo.cluster_bits - ub)            # units per cluster
        u = i * per + ((offset >> ub) & (per - 1))
        count = min((in_u + length + (1 << ub) - 1) >> ub, geo.slice_entries * per - u)
        kind, host, run = kernels.l2_next_run(l2, u, count, geo.cluster_bits, need_copied,
                                              geo.extended_l2, self.state.external_data)
        w = i * geo.l2_entry_words
        entry = int(l2[w])
        n = min((run << ub) - in_u, length)
        where = self.slice_key(l2off, l2i) + geo.l2_entry_bytes * i
        if kind == INVALID:
            what = f"L2 entry {entry:#x}" + (f" (subcluster bitmap {int(l2[w + 1]):#x})"
                                             if geo.extended_l2 else "")
            raise CorruptImageError(f"{what} for guest offset {offset:#x} is invalid: reserved "
                                    "bits set, an unaligned host offset" +
                                    (", or a subcluster bitmap that contradicts itself or the "
                                     "descriptor" if geo.extended_l2 else ""),
                                    offset=where, field="L2 entry")
        if kind == DATA and host + (run << ub) > host_limit:
            raise CorruptImageError(f"L2 entry for guest offset {offset:#x} points to host "
                                    f"cluster {host:#x}, past the end of the image",
                                    offset=where, field="L2 entry")
        if kind == COMPRESSED:
            coff, csize = geo.compressed_extent(entry)
            if coff + csize > host_limit + 512 or coff < geo.cluster_size:
                raise CorruptImageError(f"compressed cluster for guest offset {offset:#x} at "
                                        f"{coff:#x} (+{csize}) lies outside the image",
                                        offset=where, field="L2 entry")
            return kind, coff, n, entry
        # (a data cluster of an external data file may lie at host offset 0:
        # guest cluster 0, data_file_raw or not)
        return kind, (host + in_u if host or kind == DATA else host), n, entry

    # -- updates (the caller holds the exclusive lock) ---------------------------

    def write_l1_entry(self, l1_index):
        self.file.pwrite(_BE64.pack(int(self.l1[l1_index])),
                         self.header.l1_table_offset + 8 * l1_index)
        self.l1_pending.pop(l1_index, None)

    def write_pending_l1(self):
        """Write the L1 entries of L2 tables allocated since the last flush.
        The caller has made those tables and their refcounts stable first.
        Returns whether anything was written."""
        pending = sorted(self.l1_pending)
        for l1i in pending:
            self.write_l1_entry(l1i)
        return bool(pending)

    def l2_slot_for_write(self, offset, refcounts):
        """Slot of the L2 slice mapping guest ``offset``, made writable: the L2
        table is allocated if missing and copied if shared.  The new L1 entry
        is pending until the next flush; a replaced table is freed then."""
        geo, cache = self.geo, self.l2_cache
        l1i, l2i = geo.l1_index(offset), geo.l2_index(offset)
        l1e = int(self.l1[l1i])
        l2off = l1e & L1E_OFFSET_MASK
        if l2off and l1e & QCOW_OFLAG_COPIED:
            return cache.load(self.slice_key(l2off, l2i))
        new = refcounts.alloc(1)
        self.metadata.add(new >> geo.cluster_bits)
        if l2off == 0:
            table = bytes(geo.cluster_size)
        else:
            # Copy-on-write of an L2 table shared with a snapshot: take its
            # current contents (dirty cached slices included).
            cache.flush()
            table = self.file.pread(l2off, geo.cluster_size)
        self.file.pwrite(table, new)
        self.state.allocated(new + geo.cluster_size)    # (fresh space: no longer zeros)
        # A slice cached under ``new`` is a table freed since (an L2 table
        # dropped by copy-on-write keeps its clean slices cached): it must
        # show the new table, not the old one.
        for k in range(geo.cluster_size // geo.slice_bytes):
            slot = cache.find(new + k * geo.slice_bytes)
            if slot >= 0:
                sb = geo.slice_bytes
                cache.u64(slot)[:] = decode_table(table[k * sb:(k + 1) * sb])
        self.l1_pending.setdefault(l1i, l1e)
        self.l1[l1i] = new | QCOW_OFLAG_COPIED
        if l2off:
            refcounts.free_deferred(l2off, 1)
        return cache.load(self.slice_key(new, l2i))

    def grow_l1(self, min_size, refcounts, barrier, flush_refcounts):
        """Move the L1 table to a new place with at least ``min_size`` entries
        (the caller holds the exclusive lock)."""
        geo, h = self.geo, self.header
        if min_size <= len(self.l1):
            return
        new_size = min_size
        nclusters = geo.size_to_clusters(new_size * L1E_SIZE)
        new = refcounts.alloc(nclusters)
        table = array("Q", self.l1)
        table.frombytes(bytes((new_size - len(table)) * L1E_SIZE))
        on_disk = array("Q", table)
        for l1i, entry in self.l1_pending.items():
            on_disk[l1i] = entry            # still pending: written at the next flush
        self.file.pwrite(encode_table(on_disk).ljust(nclusters * geo.cluster_size, b"\0"), new)
        self.state.allocated(new + nclusters * geo.cluster_size)
        flush_refcounts()
        # Barrier: the new table is on disk before the header points to it.
        barrier()
        old_off, old_size = h.l1_table_offset, h.l1_size
        offset, fields = pack_fields(l1_size=new_size, l1_table_offset=new)
        self.file.pwrite(fields, offset)
        barrier()
        h.l1_size, h.l1_table_offset = new_size, new
        self.l1 = table
        self.state.set_l1(table)
        self.metadata.add(new >> geo.cluster_bits, nclusters)
        if old_size:
            n_old = geo.size_to_clusters(old_size * L1E_SIZE)
            self.metadata.remove(old_off >> geo.cluster_bits, n_old)
            refcounts.free(old_off, n_old)

    def replace_l1(self, l1, offset):
        """Make ``l1`` (at ``offset``, already named by the header) the
        active table: applying a snapshot.  The caller holds the exclusive
        lock, has flushed, and drops the L2 cache; the C path's view
        (state.l1) follows."""
        self.l1 = l1
        self.state.set_l1(l1)
        self.l1_pending = {}
