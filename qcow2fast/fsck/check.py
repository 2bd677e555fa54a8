"""qemu-img check (the checking half of qemu's qcow2-refcount.c).

``check_image`` compares the stored refcounts with those the metadata
implies, with qemu's messages, counts and exit statuses, and with ``fix``
plans the repair that :func:`qcow2fast.fsck.repair.repair_image` carries
out.  The stored refcounts and their comparison live in ``stored.py``,
the bounds that keep a hostile image's cost in proportion to its file in
``bounds.py``.
"""

import numpy as np

from .._ext.kernels import l2_copied_rows, l2_tally_tables
from ..spec.constants import (L1E_OFFSET_MASK, L1E_RESERVED_MASK, L1E_SIZE, L2E_OFFSET_MASK,
                              QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, REFT_OFFSET_MASK, SC_ALLOC_MASK,
                              REFT_RESERVED_MASK)
from ..spec.entries import (decode_table, has_copied, host_offsets, is_compressed, l1_reserved,
                            l2_reserved, l2_table_offsets, sc_alloc_bits, sc_zero_bits,
                            standard_allocated)
from ..spec.geometry import Geometry
from ..spec.entries import at_host0
from ..spec.header import INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, MAX_L1_BYTES
from ..engine.crypto import header_ranges as crypto_header_ranges
from ..engine.bitmap_list import check_loadable, referenced_ranges
from . import new_structures
from .result import CheckResult, ToolMessage
from .bounds import MAX_EXPLAINED, MAX_MESSAGES, Bounds, l2_batches, read_l2_tables
from .past_eof import past_eof, replacement
from .tally import RefcountTally
from .references import describe, find_references
from .stored import StoredRefcounts, compare_refcounts, last_true


# -- qemu-img check ------------------------------------------------------------------
#
# ``check_image`` is qemu 7.2's qcow2_check_refcounts (calculate_refcounts,
# compare_refcounts, check_oflag_copied) on a file opened read-only: it
# never writes, and it reads malformed metadata the way qemu does rather
# than refusing it as Image does.  With ``fix`` it also plans the repair
# qemu's -r leaks / -r all make (same messages and counts), which
# ``repair_image`` then carries out.


# qemu's truncate refuses a file size past INT64_MAX.
INT64_MAX = (1 << 63) - 1

# The most clusters -r all grows a file to, to hold a refcount block past its
# end (the count covers them all: 4 bytes each, 256 MiB here).
MAX_GROWN_CLUSTERS = 1 << 26


def _c_hex(n):
    """C's %#x: 0 has no 0x prefix."""
    return f"{n:#x}" if n else "0"


class _Checker:
    def __init__(self, f, h, fix=None, explain=False):
        self.f, self.h, self.fix, self.explain = f, h, fix, explain
        self.geo = Geometry(h.cluster_bits, h.refcount_order,
                            extended_l2=h.incompatible_features & INCOMPAT_EXTL2)
        self.cs = self.geo.cluster_size
        self.file_size = f.size()
        # An external data file: data clusters are there, without refcounts
        # (qemu's has_data_file branches of check_refcounts_l2/check_oflag_copied).
        self.external = bool(h.incompatible_features & INCOMPAT_DATA_FILE)
        self.res = CheckResult()
        # one spare: a compressed cluster may end in the cluster past EOF
        self.tally = RefcountTally(-(-self.file_size // self.cs) + 1, grow=True)
        self.zeroed = set()         # L2 entries the repair turns into plain zero clusters
        self.again = []             # what a count after a rebuild says again
        self.l1_fixed = {}          # file offset -> L1 entry with its reserved bits cleared
        self.bounds = Bounds(self.file_size, h.nb_snapshots, self.geo.cluster_bits)
        self.active_over = None     # active L1 entries past the visit bound (Bounds.over_visits)
        self.old_structures = []    # clusters of the refcount table and blocks, as counted

    def msg(self, text):
        if len(self.res.messages) < MAX_MESSAGES:
            self.res.messages.append(text)
        else:
            self.res.messages_dropped += 1

    def malformed_entry(self, text):
        """A corruption no refcount repair fixes: qemu finds (and says) it
        again in its count after a rebuild."""
        self.msg(text)
        if len(self.again) < MAX_MESSAGES:
            self.again.append(text)
        self.res.corruptions += 1
        self.res.malformed += 1

    def inc(self, offset, size):
        """qemu's qcow2_inc_refcounts_imrt for one byte range: the clusters
        counted."""
        if size <= 0:
            return []
        if offset + size - self.file_size >= self.cs:
            self.msg("ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset {offset:#x} size {size:#x}")
            self.res.corruptions += 1
            return []
        cb = self.geo.cluster_bits
        clusters = np.arange(offset >> cb, ((offset + size - 1) >> cb) + 1)
        self.tally.add(clusters)
        return clusters

    def read_l2(self, l2off):
        """One L2 table, native byte order."""
        return read_l2_tables(self.f, self.cs, [l2off])[0].astype(np.uint64)

    def check_l2(self, l2off, active):
        """qemu's check_refcounts_l2: the common entries vectorised, the odd
        ones (compressed, malformed, past EOF) one by one in table order so
        the messages come out in qemu's order."""
        res, geo, cs = self.res, self.geo, self.cs
        words = self.read_l2(l2off)
        step = geo.l2_entry_words
        l2 = words[::step]
        # extended entries: the subcluster bitmaps (allocated: bits 0-31, zero: 32-63)
        bms = words[1::2] if step == 2 else np.zeros(len(l2), dtype=np.uint64)
        compressed = is_compressed(l2)
        offs = host_offsets(l2)
        std_alloc = standard_allocated(l2)
        reserved = l2_reserved(l2)
        if self.external:       # host offset 0 in the data file (COPIED tells it)
            std_alloc |= at_host0(l2) & ~reserved
        unaligned = std_alloc & ((offs & np.uint64(cs - 1)) != 0)
        past = std_alloc & (offs >= np.uint64(self.file_size)) & (not self.external)
        alloc_bits = sc_alloc_bits(bms)
        both = std_alloc & ((sc_zero_bits(bms) & alloc_bits) != 0)
        bad_bitmap = (compressed & (bms != 0)) | (~compressed & (offs == 0) & (alloc_bits != 0)
                                                  & ~(at_host0(l2) & self.external))
        # -r all: entries whose data lies past the end of the file become zero (past_eof.py)
        gone = past_eof(geo, l2, self.file_size) & ~reserved & ~both & ~bad_bitmap \
            if self.fix == "all" and not l2off & (cs - 1) and not self.external \
            else np.zeros(len(l2), dtype=bool)
        odd = compressed | reserved | unaligned | past | both | bad_bitmap | gone
        for i in np.nonzero(odd)[0]:
            e = int(l2[i])
            if reserved[i]:
                self.malformed_entry(f"ERROR found l2 entry with reserved bits set: {e:x}")
            if bad_bitmap[i]:
                if compressed[i]:
                    self.malformed_entry(f"ERROR compressed cluster {i} with non-zero subcluster "
                                         f"allocation bitmap, entry={e:#x}")
                    compressed[i] = False           # qemu does not count it
                else:
                    self.malformed_entry("ERROR: Unallocated cluster has non-zero subcluster "
                                         "allocation map")
                continue
            if gone[i]:
                self.zero_past_eof(l2off, int(i), e, int(bms[i]), bool(compressed[i]))
                std_alloc[i] = compressed[i] = False
                continue
            if both[i]:
                self.malformed_entry(f"ERROR offset={e & L2E_OFFSET_MASK:x}: Allocated cluster has "
                         "corrupted subcluster allocation bitmap")
            if compressed[i]:
                if e & QCOW_OFLAG_COPIED:
                    self.malformed_entry(f"ERROR: coffset={e & geo.cluster_offset_mask:#x}: copied flag "
                             "must never be set for compressed clusters")
                    e &= ~QCOW_OFLAG_COPIED
                if self.external:
                    self.msg(f"ERROR compressed cluster {i} with data file, entry={e:#x}")
                    res.corruptions += 1
                    compressed[i] = False           # qemu does not count it
                    continue
                coff, csize = geo.compressed_extent(e)
                self.inc(coff, csize)
            elif std_alloc[i]:
                off = e & L2E_OFFSET_MASK
                if unaligned[i]:
                    # no data: a zero cluster, or (extended) no subcluster allocated
                    no_data = not bms[i] & SC_ALLOC_MASK if step == 2 else e & QCOW_OFLAG_ZERO
                    if no_data and self.fix == "all" and not l2off & (cs - 1):
                        # qemu makes it read as zeros without the cluster (it did
                        # already); not inside an L2 table that is itself misplaced,
                        # where qemu's write would land on whatever the table overlaps
                        self.msg(f"Repairing offset={off:x}: Preallocated cluster is not "
                                 "properly aligned; L2 entry corrupted.")
                        res.corruptions_fixed += 1
                        at = l2off + 8 * step * int(i)
                        new, new_bitmap = replacement(self.h.version, e, int(bms[i]), step == 2)
                        res.entry_fixes.append((at, new))
                        if step == 2:
                            res.entry_fixes.append((at + 8, new_bitmap))
                        self.zeroed.add(at)
                        std_alloc[i] = False
                        continue
                    kind = "Preallocated" if no_data else "Data"
                    self.malformed_entry(f"ERROR offset={off:x}: {kind} cluster is not properly "
                                         "aligned; L2 entry corrupted.")
                if not self.external:
                    self.inc(off, cs)
        ncomp = int(np.count_nonzero(compressed))
        if active:
            o = offs[std_alloc]
            res.allocated_clusters += len(o) + ncomp
            res.compressed_clusters += ncomp
            res.fragmented_clusters += ncomp + int(
                np.count_nonzero(o[1:] != o[:-1] + np.uint64(cs)))
        if not self.external:
            self.tally.add(offs[std_alloc & ~odd] >> np.uint64(geo.cluster_bits))

    def zero_past_eof(self, l2off, i, e, bitmap, compressed):
        """Plan the repair of L2 entry ``i`` (``e``) of the table at ``l2off``,
        whose data lies past the end of the file: it becomes a zero cluster."""
        res, geo = self.res, self.geo
        off = geo.compressed_extent(e)[0] if compressed else e & L2E_OFFSET_MASK
        what = "Compressed" if compressed else "Data"
        self.msg(f"Repairing offset={off:x}: {what} cluster lies past the end of the file; "
                 "L2 entry made a zero cluster.")
        res.corruptions_fixed += 1
        at = l2off + geo.l2_entry_bytes * i
        new, new_bitmap = replacement(self.h.version, e, bitmap, geo.extended_l2)
        res.entry_fixes.append((at, new))
        if geo.extended_l2:
            res.entry_fixes.append((at + 8, new_bitmap))
        self.zeroed.add(at)

    def check_l1(self, l1_offset, l1_size, active):
        res, cs = self.res, self.cs
        self.inc(l1_offset, l1_size * L1E_SIZE)
        if not l1_size:
            return
        if l1_offset + l1_size * L1E_SIZE > self.file_size:
            # qemu reads past the end of the file as zeros: only the entries
            # inside it can name anything (the reference was counted above).
            l1_size = max(0, self.file_size - l1_offset) // L1E_SIZE
            if not l1_size:
                return
        if not self.bounds.take_l1(l1_size):
            # Only L1 tables that overlap can add up to more than the file holds.
            self.malformed_entry(f"ERROR: L1 table at {l1_offset:#x} ({l1_size} entries) overlaps other "
                     "L1 tables: not checked")
            return
        l1 = decode_table(self.f.pread(l1_offset, l1_size * L1E_SIZE))
        l2offs = l2_table_offsets(l1)
        # Entries with nothing to report and whose tables have nothing to
        # report are counted in bulk; the others one by one, in table order,
        # so that the messages come out in qemu's order.
        plain = ~l1_reserved(l1) & (l2offs != 0) \
            & ((l2offs & np.uint64(cs - 1)) == 0) & (l2offs < np.uint64(self.file_size))
        slow = np.zeros(len(l1), dtype=bool)
        slow[l1 != 0] = True
        over = self.bounds.over_visits(self.tally.counts, l2offs, plain)
        if active:
            self.active_over = over
        if over.any():              # counted as references to the table only
            self.tally.add(l2offs[over] >> np.uint64(self.geo.cluster_bits))
            plain &= ~over
            slow &= ~over
        for idx, tables in l2_batches(self.f, self.cs, l2offs, np.nonzero(plain & ~self.external)[0]):
            odd = np.zeros(len(idx), dtype=np.uint8)
            stats = l2_tally_tables(tables.view(np.uint64), self.tally.counts, odd,
                                    self.geo.cluster_bits, self.file_size, self.geo.extended_l2)
            clean = idx[odd == 0]
            slow[clean] = False
            self.tally.add(l2offs[clean] >> np.uint64(self.geo.cluster_bits))
            if active:
                res.allocated_clusters += stats[0]
                res.compressed_clusters += stats[1]
                res.fragmented_clusters += stats[2]
        for i in np.nonzero(slow)[0]:
            self.check_l1_entry(l1_offset, int(i), int(l1[i]), active)

    def check_l1_entry(self, l1_offset, i, e, active):
        """qemu's check_refcounts_l1 for one entry."""
        res, cs = self.res, self.cs
        if e & L1E_RESERVED_MASK:
            if self.fix == "all":
                # qemu reads through such an entry ignoring the bits (and its
                # -r all leaves them); clearing them keeps what qemu reads
                self.msg(f"Repairing L1 entry with reserved bits set: {e:x}")
                res.corruptions_fixed += 1
                self.l1_fixed[l1_offset + L1E_SIZE * i] = e & ~L1E_RESERVED_MASK
                res.entry_fixes.append((l1_offset + L1E_SIZE * i, e & ~L1E_RESERVED_MASK))
            else:
                self.malformed_entry(f"ERROR found L1 entry with reserved bits set: {e:x}")
        l2off = e & L1E_OFFSET_MASK
        self.inc(l2off, cs)
        if l2off & (cs - 1):
            self.malformed_entry(f"ERROR l2_offset={l2off:x}: Table is not cluster aligned; "
                     "L1 entry corrupted")
        if l2off < self.file_size:      # else qemu's read fails; already counted above
            self.check_l2(l2off, active)

    def refcount_table(self):
        h = self.h
        raw = self.f.pread(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        return decode_table(bytes(raw).ljust(h.refcount_table_clusters * self.cs, b"\0"))

    def check_refblocks(self, table):
        """qemu's check_refblocks: counts each refcount block, and with -r all
        plans the growth of a file that ends before one of them."""
        res, cs = self.res, self.cs
        for i, e in enumerate(table):
            e = int(e)
            off = e & REFT_OFFSET_MASK
            if e & REFT_RESERVED_MASK:
                self.msg(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                res.rebuild = True
                continue
            if off & (cs - 1):
                self.msg(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                         "entry corrupted")
                res.corruptions += 1
                res.rebuild = True
                continue
            if off and (off >> self.geo.cluster_bits) >= -(-self.file_size // cs):
                res.corruptions += 1
                if self.fix != "all":
                    self.msg(f"ERROR refcount block {i} is outside image")
                    continue
                self.msg(f"Repairing refcount block {i} is outside image")
                if off > INT64_MAX - cs:        # qemu's truncate refuses it
                    self.msg("ERROR could not resize image: Invalid argument")
                    res.rebuild = True
                    continue
                if (off + cs) >> self.geo.cluster_bits > MAX_GROWN_CLUSTERS:
                    # Past what the count can cover (and, at these sizes, past
                    # what ext4 takes: qemu's truncate fails there with EFBIG).
                    self.msg(ToolMessage("Could not resize file: File too large"))
                    self.msg("ERROR could not resize image: File too large")
                    res.rebuild = True
                    continue
                # the repair grows the file to hold the block (read as zeros until then)
                res.grow_to = self.file_size = off + cs
                res.corruptions -= 1
                res.corruptions_fixed += 1
                self.old_structures.extend(self.inc(off, cs))
                continue
            if off:
                self.old_structures.extend(self.inc(off, cs))
                c = off >> self.geo.cluster_bits
                # qemu's count saturates at the maximum (the overflow is reported apart)
                n = min(int(self.tally.counts[c]), self.geo.refcount_max)
                if n != 1:
                    self.msg(f"ERROR refcount block {i} refcount={n}")
                    res.corruptions += 1
                    res.rebuild = True

    def snapshot_l1_bad(self, s):
        """qemu's check of a snapshot's L1 fields (then skips its table)."""
        if s.l1_table_offset % self.cs:
            why = f"l1_offset={s.l1_table_offset:#x}: L1 table is not cluster aligned"
        elif s.l1_size > MAX_L1_BYTES // L1E_SIZE:
            why = f"l1_size={s.l1_size:#x}: L1 table is too large"
        else:
            return False
        self.msg(f"ERROR snapshot {s.id} ({s.name}) {why}; snapshot table entry corrupted")
        self.res.corruptions += 1
        return True

    def run(self, snapshots, snap_bytes):
        h, res, cs, geo = self.h, self.res, self.cs, self.geo
        res.total_clusters = geo.size_to_clusters(h.size)
        res.flags = h.incompatible_features & 3 if h.version >= 3 else 0   # dirty, corrupt
        self.inc(0, cs)
        self.check_l1(h.l1_table_offset, h.l1_size, True)
        for s in snapshots:
            if self.snapshot_l1_bad(s):
                continue
            self.check_l1(s.l1_table_offset, s.l1_size, False)
        if h.nb_snapshots:
            self.inc(h.snapshots_offset, snap_bytes)
        self.old_structures = list(self.inc(h.refcount_table_offset,
                                            h.refcount_table_clusters * cs))
        ranges, broken = referenced_ranges(self.f, h, h.size)
        if broken:              # qemu's qcow2_check_bitmaps_refcounts fails the whole check
            res.failed = "Invalid argument"
            return res
        for off, n, _ in ranges + crypto_header_ranges(h):
            self.inc(off, n)
        table = self.refcount_table()
        self.check_refblocks(table)
        expected = self.tally.counts
        over = np.nonzero(expected > np.uint64(geo.refcount_max))[0]
        if len(over):
            # qemu would rebuild with the saturated counts, and a cluster whose
            # count reaches 0 while still referenced gets handed out again
            c = int(over[0])
            res.rebuild_refused = (f"host cluster {c * cs:#x} needs refcount {int(expected[c])}"
                                   f", more than {geo.refcount_bits} bits hold")
        told = 0
        for c in over:
            # qemu's counter saturates; every reference past the maximum is an error
            # (qemu says so for each; at most MAX_EXPLAINED are said here)
            excess = int(expected[c]) - geo.refcount_max
            for _ in range(min(excess, MAX_EXPLAINED - told)):
                self.msg(f"ERROR: overflow cluster offset={int(c) * cs:#x}")
                self.msg("Use qemu-img amend to increase the refcount entry width or qemu-img "
                         "convert to create a clean copy if the image cannot be opened for "
                         "writing")
                told += 1
            res.corruptions += excess
            res.malformed += excess
            expected[c] = geo.refcount_max
        n = max(-(-self.file_size // cs), last_true(expected != 0) + 1)
        if len(expected) < n:
            expected = np.concatenate([expected, np.zeros(n - len(expected), expected.dtype)])
        expected = expected[:n]
        stored, mismatch, end = compare_refcounts(self.f, self.file_size, geo, table, expected)
        res.image_end_offset = max(end, 1) * cs        # qemu: (highest cluster, 0 if none, + 1)
        # What points at each mismatched cluster, said under qemu's line.
        explain = [c for c in mismatch[:MAX_EXPLAINED].tolist() if c in stored.values] \
            if self.explain else []
        refs = find_references(self.f, self.h, explain) if explain else {}
        signalled = False
        for c in mismatch.tolist():
            if c not in stored.values:
                if not signalled:
                    # qemu's qcow2_signal_corruption, said once per open
                    signalled = True
                    t = c // stored.per_block
                    self.msg("qcow2: Image is corrupt: Refblock offset "
                             f"{int(table[t]) & REFT_OFFSET_MASK:#x} unaligned (reftable index: "
                             f"{_c_hex(t)}); further non-fatal corruption events will be "
                             "suppressed")
                self.msg(f"Can't get refcount for cluster {c}: Input/output error")
                res.check_errors += 1
                continue
            r1, r2 = stored.values[c], int(expected[c])
            if r1 == 0:
                res.rebuild = True
            if r1 < r2:
                self.msg(f"ERROR cluster {c} refcount={r1} reference={r2}")
                res.corruptions += 1
                res.too_low.append((c, r1, r2))
            else:
                self.msg(f"Leaked cluster {c} refcount={r1} reference={r2}")
                res.leaks += 1
                res.leaked.append((c, r1, r2))
            if c in refs:
                self.msg(describe(c, self.geo.cluster_bits, refs[c]))
        after = stored
        copied_repair = False
        if self.fix == "all" and res.rebuild:
            self.msg("Rebuilding refcount structure")
            for text in self.again:         # (qemu counts the references anew)
                self.msg(text)
            res.new_structures = None if res.rebuild_refused else \
                new_structures.plan(geo, expected, self.old_structures)
            for c, r1, r2 in res.new_structures.freed if res.new_structures else ():
                # qemu's second pass frees the old structures, leaked by its rebuild
                self.msg(f"Repairing cluster {c} refcount={r1} reference={r2}")
            # the refcounts as the rebuild leaves them (the old structures freed)
            after = StoredRefcounts(res.new_structures.counts if res.new_structures else expected,
                                    stored.per_block)
            # qemu counts as fixed what a second count no longer finds; the
            # malformed entries are found again
            res.leaks_fixed = res.leaks
            res.corruptions_fixed += res.corruptions - res.malformed
            copied_repair = True
        elif self.fix and res.rebuild:
            self.msg("ERROR need to rebuild refcount structures")
            res.check_errors += 1
            return res
        elif self.fix:
            for c, r1, r2 in sorted(res.leaked + res.too_low):     # (qemu: in cluster order)
                fixable = r1 > r2 or self.fix == "all"
                self.msg(f"{'Repairing' if fixable else 'ERROR'} cluster {c} refcount={r1} "
                         f"reference={r2}")
                if fixable:
                    res.refcount_fixes.append((c, r2))
            after = stored.with_values(res.refcount_fixes)
            res.leaks_fixed = len(res.leaked)
            if self.fix == "all":
                res.corruptions_fixed += len(res.too_low)
            # qemu: -r leaks repairs COPIED flags only when nothing else is wrong
            copied_repair = self.fix == "all" or not (res.check_errors or res.corruptions)
        self.check_copied(after, copied_repair)
        return res

    def check_copied(self, stored, repair):
        """qemu's check_oflag_copied on the active L1 (against the ``stored``
        refcounts, a StoredRefcounts, as they are after the refcount repair
        when fixing)."""
        res, h = self.res, self.h
        cb = np.uint64(self.geo.cluster_bits)
        word = "Repairing" if repair else "ERROR"

        def refcounts(offsets):
            """(refcounts, readable) of the clusters at ``offsets``."""
            return stored.get((np.asarray(offsets, dtype=np.uint64) >> cb).astype(np.int64))

        def data_refcounts(offsets):
            """The same for data clusters (in a data file: 1, as qemu)."""
            if not self.external:
                return refcounts(offsets)
            return np.ones(len(offsets), dtype=np.int64), np.ones(len(offsets), dtype=bool)

        if not h.l1_size or h.l1_table_offset + h.l1_size * L1E_SIZE > self.file_size:
            return
        l1 = decode_table(self.f.pread(h.l1_table_offset, h.l1_size * L1E_SIZE))
        for off, e in self.l1_fixed.items():
            if h.l1_table_offset <= off < h.l1_table_offset + L1E_SIZE * len(l1):
                l1[(off - h.l1_table_offset) // L1E_SIZE] = e
        l2offs = l2_table_offsets(l1)
        skip = self.active_over if self.active_over is not None else False
        used = np.nonzero((l2offs != 0) & ~skip)[0]
        # The L1 entries whose own flag or whose table holds a wrong flag;
        # found in bulk, then reported one by one in table order.
        rcs, readable = refcounts(l2offs[used])
        suspect = set(used[readable & ((rcs == 1) != has_copied(l1[used]))].tolist())
        tables = {}
        state = stored.state()
        for idx, batch in l2_batches(self.f, self.cs, l2offs,
                                     used[l2offs[used] < np.uint64(self.file_size)]):
            rows = np.ones(len(idx), dtype=np.uint8)
            if not self.external:
                rows[:] = 0
                l2_copied_rows(batch.view(np.uint64), state, self.geo.cluster_bits, rows,
                               self.geo.extended_l2)
            for r in np.nonzero(rows)[0]:
                l2 = batch[r].astype(np.uint64)[::self.geo.l2_entry_words]
                sel = standard_allocated(l2)
                rcs2, readable2 = data_refcounts(host_offsets(l2[sel]))
                wrong = np.zeros(len(l2), dtype=bool)
                wrong[sel] = ((rcs2 == 1) != has_copied(l2[sel])) & readable2
                rc_of = np.zeros(len(l2), dtype=np.int64)
                rc_of[sel] = rcs2
                suspect.add(int(idx[r]))
                tables[int(idx[r])] = (l2, wrong, rc_of)
        for i in sorted(suspect):
            e = int(l1[i])
            l2off = e & L1E_OFFSET_MASK
            rcs, readable = refcounts([l2off])
            rc = int(rcs[0])
            if readable[0] and (rc == 1) != bool(e & QCOW_OFLAG_COPIED):
                self.msg(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} "
                         f"refcount={rc}")
                res.copied += 1
                if repair:
                    res.corruptions_fixed += 1
                    res.entry_fixes.append((h.l1_table_offset + L1E_SIZE * i,
                                            e ^ QCOW_OFLAG_COPIED))
                else:
                    res.corruptions += 1
            if i not in tables:
                continue
            l2, wrong, rc_of = tables[i]
            for j in np.nonzero(wrong)[0]:
                if l2off + self.geo.l2_entry_bytes * int(j) in self.zeroed:
                    continue
                e2 = int(l2[j])
                rc2 = int(rc_of[j])
                self.msg(f"{word} OFLAG_COPIED data cluster: l2_entry={e2:x} "
                         f"refcount={rc2}")
                res.copied += 1
                if repair:
                    res.corruptions_fixed += 1
                    res.entry_fixes.append((l2off + self.geo.l2_entry_bytes * int(j),
                                            e2 ^ QCOW_OFLAG_COPIED))
                else:
                    res.corruptions += 1


def check_image(path, fix=None, explain=False):
    """Check the qcow2 image at ``path`` without writing to it (qemu-img
    check without -r).  Returns a CheckResult; raises Qcow2Error/OSError
    when the image cannot be checked at all (unreadable header).  With
    ``explain``, a line under each leak and corruption says what references
    the cluster (qemu-img prints no such line)."""
    from ..spec import header as hdr
    from ..engine.snapshot import TableRepairs
    from ..host.file import open_image_file
    from .snapshot_table import account, clamp_count, read_for_check
    f = open_image_file(path, "qcow2", locking=False)    # locked by the caller, or a URL
    try:
        size = f.size()
        repairs = TableRepairs(fix == "all")
        h = hdr.parse_header(clamp_count(f.pread(0, min(size, 2 << 20)), fix == "all", repairs),
                             size, check=True)
        hdr.check_features(h, False)
        snapshots, snap_bytes = read_for_check(f, h, repairs)
        check_loadable(f, h, h.size)        # qemu cannot open (so check) such an image
        res = _Checker(f, h, fix, explain).run(snapshots, snap_bytes)
        account(res, repairs)
        return res
    finally:
        f.close()
