"""Creating, applying, deleting and renaming internal snapshots, and the
VM state (qemu's qcow2-snapshot.c: qcow2_snapshot_create, _goto, _delete;
qcow2.c: qcow2_save_vmstate, qcow2_load_vmstate).

``Snapshots`` is given the image's state and the subsystems it works
through: ``Mapping`` (the active L1 table), ``Refcounts``, ``Clusters``
(VM state is guest data past the disk) and the flusher.  Every operation
runs under the image's exclusive lock and starts from a consistent image
on disk: everything pending is flushed first, refcounts included (also
under lazy refcounts, whose dirty bit is then cleared), so each step below
only has to order its own writes.  Each barrier is ``state.barrier()``.

Write order (a crash at any point leaves the old or the new snapshot
list, with at worst leaked clusters):

create   snapshot L1 copy written; on v3 the dirty bit set, **barrier**;
         refcounts of the active tree raised, **barrier** (the shared
         clusters are counted before anything relies on it); COPIED
         cleared in the active L2 tables and L1 (in any order: no pointer
         changes); the new snapshot table, **barrier**, header (table
         switched and dirty bit cleared in one write), **barrier**, old
         table freed.
apply    refcounts of the snapshot's tree raised (and COPIED cleared in
         its L2 tables), **barrier**; the new active L1 table written to
         new clusters, **barrier**; header (size, l1_size, l1_table_offset
         in one write), **barrier**; only then the old active tree's
         refcounts lowered and its L1 table freed, **barrier**.  Unlike
         qemu (which overwrites the L1 table in place) the old active
         table stays intact until the header no longer names it.  No
         COPIED flag is ever out of step: every table the new active L1
         names is shared with the snapshot.
delete   the snapshot table without the entry, **barrier**, header (table
         switched and, on v3, the dirty bit set in one write),
         **barrier**; the snapshot tree's refcounts lowered and its L1
         table freed, **barrier**; COPIED set in the active L2 tables and
         L1 where the refcounts dropped to 1, **barrier**; dirty bit
         cleared (made stable by the next barrier: close's).

The COPIED window.  Between a refcount change of create or delete and
the COPIED rewrite, active entries carry a COPIED flag that disagrees
with their refcount (2 with COPIED set, or 1 without), which qemu-img
check reports as OFLAG_COPIED corruption (qemu itself has this window).
On v3 the dirty bit covers it: qemu's open for writing and ours rebuild
a dirty image's refcounts and COPIED flags (check -r all) before the
first write, and check -r all mends it.  v2 has no dirty bit: a state
cut there keeps the OFLAG_COPIED reports until check -r all, but no data
is at risk, because the snapshot table is switched outside the window --
create publishes the new snapshot only after the flags are cleared, so a
stale COPIED flag marks a cluster no snapshot names yet; delete drops the
snapshot before the refcounts, so the window only has clusters of
refcount 1 without COPIED, which a write copies needlessly.

An operation that raises after its first write (an I/O error, a limit,
an interrupt) runs under ``features.steps``: the image stops taking
writes and keeps its dirty bit (v3), so close does not seal a half-done
operation and the next read-write open repairs it
(tests/api/test_interrupted_ops.py).

tests/interop/test_snapshot_crash.py stops each operation at each of
its barriers and checks these claims with qemu-img check.
"""

import errno
import os
import time
import warnings

from array import array

from .._ext.kernels import l2_next_run, table_and, table_first_with
from ..errors import (CorruptImageError, InvalidArgumentError, LeakWarning, LimitExceededError,
                      qemu_step)
from ..spec.constants import (COMPRESSED, DATA, L1E_OFFSET_MASK, L1E_SIZE, QCOW_OFLAG_COPIED,
                              UNALLOCATED, ZERO)
from ..spec.header import pack_fields
from ..spec.tables import ALL_BITS, decode_table, encode_table
from ..spec.snapshot import MAX_SNAPSHOTS, Snapshot
from . import features
from .snapshot import (find_index, l1_inside_file, new_snapshot_id, snapshot_l1,
                       write_snapshot_table)
from .snapshot_refcount import Plan, Tree, discard_freed, host_clusters, new_counts

_NOT_COPIED = ALL_BITS & ~QCOW_OFLAG_COPIED
_CHUNK = 1 << 20                # VM state copied from a file this much at a time


class Snapshots:
    """The snapshot operations of an image open for writing.  ``image``
    is the Image: its ``snapshots`` list and ``snapshot_table_bytes`` are
    the table as read and as this object keeps them."""

    def __init__(self, image):
        self.image = image
        self.state = image.state
        self.geo = image.state.geo
        self.mapping = image.mapping
        self.refcounts = image.refcounts
        self.clusters = image.clusters
        self.flusher = image.flusher

    # -- helpers -------------------------------------------------------------------------

    def _settle(self):
        """Make the image consistent on disk before an operation: the
        ordered flush, refcounts included, and a clean dirty bit."""
        s = self.state
        self.flusher.flush(sync=not s.unsafe, final=True)
        if features.is_dirty(s):
            features.set_dirty(s, False)
        # The operations read and write L2 tables in the file directly.
        s.l2_cache.invalidate_all()

    def _publish_table(self, snapshots, dirty=None):
        img = self.image
        h = self.state.header
        _, nbytes = write_snapshot_table(self.state, self.refcounts, snapshots,
                                         h.snapshots_offset, img.snapshot_table_bytes, dirty)
        img.snapshots, img.snapshot_table_bytes = snapshots, nbytes

    def _after(self):
        """What the data path caches about host space or tables is stale."""
        s = self.state
        s.l2_cache.invalidate_all()
        self.clusters.compressed.forget()
        s.grow_host_limit(self.refcounts.end_cluster << self.geo.cluster_bits)

    def _sync(self):
        self.state.refcount_cache.flush()
        self.state.barrier()

    def _snapshot_l1(self, sn):
        f = self.state.file
        return snapshot_l1(f, sn, self.geo.cluster_size, f.size())

    def _plan(self, trees, addend, what, extra=()):
        counts = new_counts(self.state, self.refcounts)
        for t in trees:
            t.tally(counts)
        for offset, n in extra:          # L1 table clusters
            first = offset >> self.geo.cluster_bits
            for c in range(first, min(first + n, len(counts))):
                counts[c] += 1
        return Plan(self.refcounts, counts, addend, what)

    def vm_state_offset(self):
        """Guest offset of the VM state area: the first L1 entry past the
        disk (qemu's qcow2_vm_state_offset)."""
        return self.geo.l1_size_for(self.state.size) * self.geo.bytes_per_l2()

    def _l1_bytes(self, n):
        return self.geo.size_to_clusters(n * L1E_SIZE)

    # -- VM state ------------------------------------------------------------------------

    def write_vmstate(self, offset, data):
        """Guest data at ``offset`` into the active VM state area (qemu's
        qcow2_save_vmstate); the L1 table grows to cover it."""
        mv = memoryview(data).cast("B")
        if offset < 0:
            raise InvalidArgumentError(f"VM state offset {offset} is negative")
        if not len(mv):
            return
        s, geo = self.state, self.geo
        start = self.vm_state_offset() + offset
        need = geo.l1_index(start + len(mv) - 1) + 1
        if need > len(self.mapping.l1):
            self.flusher.flush(sync=not s.unsafe)     # no L1 entry pending across the move
            self.mapping.grow_l1(need, self.refcounts, s.barrier, s.refcount_cache.flush)
        self.clusters.write(start, mv)

    def read_vmstate(self, sn, offset, length):
        """``length`` bytes at ``offset`` of a snapshot's VM state (or of
        the active VM state area when ``sn`` is None)."""
        if offset < 0 or length < 0:
            raise InvalidArgumentError("VM state offset and length must not be negative")
        out = bytearray(length)
        if sn is None:
            if length:
                self.clusters.read(self.vm_state_offset() + offset, memoryview(out))
            return bytes(out)
        if offset + length > sn.vm_state_size:
            raise InvalidArgumentError(f"[{offset}, {offset + length}) is past the end of the "
                                       f"VM state of snapshot {sn.id} ({sn.vm_state_size} "
                                       "bytes)")
        disk = self.state.size if sn.disk_size is None else sn.disk_size
        base = self.geo.l1_size_for(disk) * self.geo.bytes_per_l2()
        self._read_through(self._snapshot_l1(sn), base + offset, memoryview(out))
        return bytes(out)

    def _read_through(self, l1, pos, out):
        """Guest [pos, pos+len(out)) as a (snapshot's) L1 table maps it,
        reading its L2 entries from the file (no cache: a table shared
        with a snapshot never changes in place)."""
        s, geo = self.state, self.geo
        ub = geo.unit_bits
        done = 0
        while done < len(out):
            p = pos + done
            l1i, l2i = geo.l1_index(p), geo.l2_index(p)
            l2off = int(l1[l1i]) & L1E_OFFSET_MASK if l1i < len(l1) else 0
            n = min(len(out) - done, ((l1i + 1) << (geo.cluster_bits + geo.l2_bits)) - p)
            if not l2off:
                out[done:done + n] = bytes(n)
                done += n
                continue
            l2 = decode_table(s.file.pread(l2off + l2i * geo.l2_entry_bytes, geo.l2_entry_bytes))
            in_u = p & ((1 << ub) - 1)
            u = (p >> ub) & ((1 << (geo.cluster_bits - ub)) - 1)
            kind, host, run = l2_next_run(l2, u, 1, geo.cluster_bits, False, geo.extended_l2)
            n = min(n, (1 << ub) - in_u)
            piece = out[done:done + n]
            if kind == DATA:
                s.read_data_into(piece, host + in_u, p)
            elif kind == COMPRESSED:
                c = geo.offset_into_cluster(p)
                piece[:] = self.clusters.compressed.cluster(int(l2[0]))[c:c + n]
            elif kind in (ZERO, UNALLOCATED):
                piece[:] = bytes(n)
            else:
                raise CorruptImageError(f"invalid L2 entry {int(l2[0]):#x} for VM state offset "
                                        f"{p:#x}", offset=l2off + l2i * geo.l2_entry_bytes,
                                        field="L2 entry")
            done += n

    # -- create --------------------------------------------------------------------------

    def create(self, name, ident=None, vm_state=None, vm_clock_nsec=0, icount=None,
               unique_name=True, date=None):
        """qemu's qcow2_snapshot_create (with savevm's VM state first)."""
        img, s, geo = self.image, self.state, self.geo
        snaps = img.snapshots
        name = str(name)
        if len(snaps) >= MAX_SNAPSHOTS:
            raise LimitExceededError(f"an image holds at most {MAX_SNAPSHOTS} snapshots")
        ident = new_snapshot_id(snaps) if ident is None else str(ident)
        for what, value in (("id", ident), ("name", name)):
            if len(value.encode()) > 0xFFFF:
                raise InvalidArgumentError(f"snapshot {what} longer than 65535 bytes")
        if any(x.id == ident for x in snaps):
            raise InvalidArgumentError(f"a snapshot with id {ident!r} exists")
        if unique_name and any(x.name == name for x in snaps):
            raise InvalidArgumentError(f"a snapshot named {name!r} exists")
        if not 0 <= vm_clock_nsec < 1 << 64 or (icount is not None
                                                and not 0 <= icount < (1 << 64) - 1):
            raise InvalidArgumentError("vm_clock_nsec and icount are unsigned 64-bit values")
        self._settle()
        what = f"snapshot {name!r}"
        # Refuse before writing anything (the VM state included): the
        # active tree must take one more reference everywhere.
        tree = Tree(s, self.mapping.l1)
        plan = self._plan([tree], 1, what)
        if vm_state is not None and not isinstance(vm_state, int) and geo.refcount_max < 2:
            raise LimitExceededError(f"{what}: refcount_bits={geo.refcount_bits} cannot share "
                                     "a VM state's clusters with a snapshot")
        vm_size = self._save_vm_state(vm_state)
        if vm_size and not isinstance(vm_state, int):
            self._settle()
            tree = Tree(s, self.mapping.l1)
            plan = self._plan([tree], 1, what)
        with features.steps(s, f"creating {what}"):
            l1 = self.mapping.l1     # (state.l1 is a view of it: it sees changes)
            # The snapshot's L1 table: a copy of the active one (COPIED is only
            # meaningful in the active table).
            n_l1 = len(l1)
            sn_l1_off = 0
            if n_l1:
                sn_l1_off = self.refcounts.alloc(self._l1_bytes(n_l1))
                s.allocated(sn_l1_off + self._l1_bytes(n_l1) * geo.cluster_size)
                copy = array("Q", l1)
                table_and(copy, _NOT_COPIED)
                s.file.pwrite(encode_table(copy), sn_l1_off)
                s.metadata.add(sn_l1_off >> geo.cluster_bits, self._l1_bytes(n_l1))
            features.set_dirty(s, True)     # barrier: the COPIED window opens (module doc)
            plan.apply()
            self._sync()            # barrier: shared clusters counted before COPIED goes
            # The L2 and L1 flags need no order between them (no pointer changes).
            tree.write_rows(tree.clear_copied())
            if table_first_with(l1, QCOW_OFLAG_COPIED) >= 0:
                table_and(l1, _NOT_COPIED)  # in place: the C path's view (state.l1) stays valid
                s.file.pwrite(encode_table(l1), s.header.l1_table_offset)
            self._after()
            now = time.time_ns() if date is None else int(date * 1e9)
            sn = Snapshot(sn_l1_off, n_l1, ident, name, now // 10**9, (now % 10**9) // 1000 * 1000,
                          vm_clock_nsec, vm_size, s.size, b"", icount)
            # The header write that names the new table clears the dirty bit:
            # the publish's first barrier made the flags stable.
            self._publish_table(snaps + [sn], dirty=False)
        if vm_size:
            # The VM state is not needed in the active tree (qemu: it would
            # only cost copy-on-write at the next snapshot).
            start = self.vm_state_offset()
            self.clusters.set_entries(start, start + -(-vm_size // geo.cluster_size)
                                      * geo.cluster_size, "discard", True)
            self.flusher.flush(sync=not s.unsafe, final=True)
        return sn

    def _save_vm_state(self, vm_state):
        if vm_state is None:
            return 0
        if isinstance(vm_state, int):       # already written with write_vmstate
            if vm_state < 0:
                raise InvalidArgumentError("a VM state size must not be negative")
            return vm_state
        if isinstance(vm_state, (bytes, bytearray, memoryview)):
            self.write_vmstate(0, vm_state)
            return memoryview(vm_state).nbytes
        if not hasattr(vm_state, "readinto") and not hasattr(vm_state, "read"):
            raise InvalidArgumentError("vm_state: bytes, a readable binary file, or the size "
                                       "of what write_vmstate wrote")
        pos = 0
        buf = bytearray(_CHUNK)
        while True:
            if hasattr(vm_state, "readinto"):
                n = vm_state.readinto(buf)
                chunk = memoryview(buf)[:n or 0]
            else:
                chunk = memoryview(vm_state.read(_CHUNK) or b"")
            if not len(chunk):
                return pos
            if isinstance(chunk.obj, str):
                raise InvalidArgumentError("vm_state must be opened in binary mode")
            self.write_vmstate(pos, chunk)
            pos += len(chunk)

    # -- apply ---------------------------------------------------------------------------

    def apply(self, which):
        """qemu's qcow2_snapshot_goto (with its resize to the snapshot's size)."""
        img, s, geo = self.image, self.state, self.geo
        sn = img.snapshots[find_index(img.snapshots, which)]
        self._settle()
        sn_l1 = self._snapshot_l1(sn)
        up = Tree(s, sn_l1)
        plan = self._plan([up], 1, f"snapshot {sn.id}")   # refuses before writing
        old_l1 = self.mapping.l1
        h = s.header
        old_off, old_n = h.l1_table_offset, h.l1_size
        size = s.size if sn.disk_size is None else sn.disk_size
        n_l1 = max(len(old_l1), sn.l1_size, geo.l1_size_for(size))
        new_l1 = array("Q", sn_l1)
        new_l1.extend(array("Q", [0]) * (n_l1 - len(new_l1)))
        table_and(new_l1, _NOT_COPIED)          # every table is shared with sn now
        with features.steps(s, f"applying snapshot {sn.id}"):
            plan.apply()
            up.write_rows(up.clear_copied())
            self._sync()        # barrier: the snapshot's tree counted twice before it is active
            new_off = self.refcounts.alloc(self._l1_bytes(n_l1))
            s.allocated(new_off + self._l1_bytes(n_l1) * geo.cluster_size)
            s.file.pwrite(encode_table(new_l1), new_off)
            self._sync()        # barrier: the new L1 table is complete before the header names it
            where, fields = pack_fields(size=size, crypt_method=h.crypt_method, l1_size=n_l1,
                                        l1_table_offset=new_off)
            s.file.pwrite(fields, where)
            s.barrier()         # barrier: the header names the new table before the old is freed
            h.size, h.l1_size, h.l1_table_offset = size, n_l1, new_off
            s.set_size(size)
            self.mapping.replace_l1(new_l1, new_off)
            s.metadata.add(new_off >> geo.cluster_bits, self._l1_bytes(n_l1))
            s.metadata.add_clusters([o >> geo.cluster_bits for o in up.offsets])
            down = self._plan([Tree(s, old_l1)], -1, "the active L1 table",
                              [(old_off, self._l1_bytes(old_n))] if old_n else [])
            down.apply()
            self._sync()
            discard_freed(s, down.freed)
            self._after()

    # -- delete and rename ---------------------------------------------------------------

    def delete(self, which):
        """qemu's qcow2_snapshot_delete."""
        img, s = self.image, self.state
        i = find_index(img.snapshots, which)
        sn = img.snapshots[i]
        self._settle()
        tree = Tree(s, self._snapshot_l1(sn))
        # An L1 table (partly) past the end of the file is not freed: qemu's
        # qcow2_free_clusters fails there ("qcow2_free_clusters failed") and
        # rolls back, leaking the part inside the file.
        l1_leaked = sn.l1_size and not l1_inside_file(sn, s.file.size())
        l1_clusters = [(sn.l1_table_offset, self._l1_bytes(sn.l1_size))] \
            if sn.l1_size and not l1_leaked else []
        what = f"snapshot {sn.id}"
        plan = self._plan([tree], -1, what, l1_clusters)  # refuses before writing
        with features.steps(s, f"deleting {what}"):
            # The header write that drops the entry sets the dirty bit, and the
            # publish's last barrier makes both stable: the COPIED window opens.
            with qemu_step("Failed to remove snapshot from snapshot list"):
                self._publish_table(img.snapshots[:i] + img.snapshots[i + 1:], dirty=True)
            with qemu_step("Failed to free the cluster and L1 table"):
                plan.apply()
                self._sync()        # barrier: refcounts drop before COPIED is set on what is now 1
            discard_freed(s, plan.freed)
            with qemu_step("Failed to update snapshot status in disk"):
                self._update_copied(plan.state)
            # After _update_copied's barrier (flags stable); the next barrier
            # (close's, the next operation's) makes the clean bit stable.
            features.set_dirty(s, False, sync=False)
            self._after()
        if l1_leaked:
            warnings.warn(LeakWarning(
                f"snapshot {sn.id}'s L1 table at {sn.l1_table_offset:#x} runs past the end of "
                "the file: its clusters inside the file are leaked",
                "qcow2_free_clusters failed: " + os.strerror(errno.EAGAIN)), stacklevel=3)
        return sn

    def _update_copied(self, state):
        """qemu's addend-0 pass: COPIED where the active tree's refcounts
        are now 1 (``state``: Plan.state, what the operation changed)."""
        s = self.state
        l1 = self.mapping.l1     # (state.l1 is a view of it: it sees changes)
        n = host_clusters(s, self.refcounts)
        full = bytearray(state[:n])
        full += b"\x02" * (n - len(full))
        active = Tree(s, l1)
        active.write_rows(active.set_copied(full))     # (L2 and L1 flags: no order needed)
        changed = False
        for i, off in zip(active.index, active.offsets):
            c = off >> self.geo.cluster_bits
            st = full[c] if c < n else 0
            new = l1[i] if st == 2 else \
                l1[i] | QCOW_OFLAG_COPIED if st == 1 else l1[i] & _NOT_COPIED
            if new != l1[i]:
                l1[i] = new         # in place: state.l1 stays a view of this array
                changed = True
        if changed:
            s.file.pwrite(encode_table(l1), s.header.l1_table_offset)
        s.barrier()             # barrier: the flags are stable before the operation returns

    def rewrite_table(self):
        """Write the table as read (check -r all, after mending it)."""
        self._settle()
        self._publish_table(list(self.image.snapshots))

    def rename(self, which, name, unique_name=True):
        """A new name for a snapshot (the table rewritten, nothing else)."""
        img = self.image
        i = find_index(img.snapshots, which)
        name = str(name)
        if unique_name and any(x.name == name for j, x in enumerate(img.snapshots) if j != i):
            raise InvalidArgumentError(f"a snapshot named {name!r} exists")
        self._settle()
        snaps = list(img.snapshots)
        old = snaps[i]
        snaps[i] = Snapshot(old.l1_table_offset, old.l1_size, old.id, name, old.date_sec,
                            old.date_nsec, old.vm_clock_nsec, old.vm_state_size, old.disk_size,
                            old.extra_data, old.icount)
        self._publish_table(snaps)
        self._after()
        return snaps[i]


