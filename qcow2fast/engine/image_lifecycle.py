"""The image's lifecycle API: persistent dirty bitmaps, resize, internal
snapshots and VM state (qemu-img bitmap/resize/snapshot, savevm/loadvm).

Thin methods over the subsystems that do the work (engine/bitmap.py,
engine/resize.py, engine/snapshot_ops.py); :class:`~.image.Image` inherits
them, and each runs under the image's exclusive lock through
``Image._update``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO, Literal

from ..errors import ImageClosedError
from . import datafile, resize
from .cache import cache_budget, cache_slots, make_caches
from .snapshot import find_snapshot

if TYPE_CHECKING:
    import collections.abc

    from .._ext._typing import Buffer
    from .image import Image
    from .snapshot import Snapshot


class LifecycleAPI:
    """Mixed into Image (a state-free mixin: every method works on the
    image's own subsystems)."""

    __slots__ = ()

    # -- persistent dirty bitmaps (engine/bitmap.py) ------------------------------------

    @property
    def bitmaps(self) -> list:
        """The persistent dirty bitmaps (engine.bitmap.Bitmap: name,
        granularity, enabled, inconsistent, flags)."""
        return list(self.dirty_bitmaps._usable())

    def add_bitmap(self, name: str, granularity: int = 65536, disabled: bool = False) -> None:
        self._check_writable()
        self.dirty_bitmaps.add(name, granularity, disabled)

    def remove_bitmap(self, name: str) -> None:
        self._check_writable()
        self.dirty_bitmaps.remove(name)

    def clear_bitmap(self, name: str) -> None:
        self._check_writable()
        self.dirty_bitmaps.clear(name)

    def enable_bitmap(self, name: str) -> None:
        self._check_writable()
        self.dirty_bitmaps.enable(name, True)

    def disable_bitmap(self, name: str) -> None:
        self._check_writable()
        self.dirty_bitmaps.enable(name, False)

    def merge_bitmap(self, source: str, target: str, source_image: Image | None = None) -> None:
        """Mark in ``target`` every granule dirty in ``source`` (a bitmap of
        this image, or of ``source_image``)."""
        self._check_writable()
        other = None if source_image is None else source_image.dirty_bitmaps
        self.dirty_bitmaps.merge(source, target, other)

    def store_bitmaps(self) -> None:
        """Write the persistent dirty bitmaps into the image now, as close
        does (same order and barriers); the image stays open and the bitmaps
        stay in use, tracking the next writes.  Then flushed, as close
        flushes after storing: the file is whole at this point."""
        self._update(self.dirty_bitmaps.checkpoint)
        self.flush()

    def dirty_extents(self, name: str, offset: int = 0,
                      length: int | None = None) -> list[tuple[int, int, bool]]:
        """[(offset, length, dirty)] covering [offset, offset+length) in
        bitmap ``name``'s granules, alternating, clipped to the disk."""
        if self.closed:
            raise ImageClosedError("dirty_extents() on a closed image")
        return self.dirty_bitmaps.dirty_extents(name, offset, length)

    # -- resizing the disk (engine/resize.py) ------------------------------------------------

    def resize(self, new_size: int, *, shrink: bool = False,
               preallocation: Literal["off", "metadata", "falloc", "full"] = "off") -> None:
        """Make the guest disk ``new_size`` bytes (a multiple of 512), as
        ``qemu-img resize``: growing maps the new area per ``preallocation``
        (it reads as zeros); shrinking needs ``shrink=True`` and frees every
        cluster past the new end.  Internal snapshots keep their own disks."""
        self._update(resize.resize, self, new_size, shrink, preallocation)
        self._update(self._fit_caches)

    def _fit_caches(self) -> None:
        """Size the metadata caches for the disk's new size from the options
        the image was opened with, as qemu does after a resize
        (qcow2_co_truncate -> qcow2_update_options -> read_cache_sizes): by
        default the L2 cache covers the whole disk, up to 32 MiB.  A cache
        whose slot count changes is replaced by an empty one, after the
        ordered flush has left both clean."""
        s = self.state
        slice_bytes, cs = s.l2_cache.slot_bytes, s.cluster_size
        l2_bytes, rc_bytes, _ = cache_budget(s.size, cs, slice_bytes, self._cache_options,
                                             s.geo.l2_entry_bytes, self.chain is not None)
        n_l2, n_rc = cache_slots(l2_bytes, rc_bytes, slice_bytes, cs)
        if (n_l2, n_rc) == (s.l2_cache.nslots, s.refcount_cache.nslots):
            return
        self.flusher.flush(sync=not s.unsafe)
        l2, rc = make_caches(s.file, slice_bytes, cs, l2_bytes, rc_bytes)
        if n_rc != s.refcount_cache.nslots:
            old, s.refcount_cache = s.refcount_cache, rc
            if self.refcounts is not None:
                self.refcounts.use_cache(rc)
            if s.l2_cache.depends is old:
                s.l2_cache.depends = rc
        if n_l2 != s.l2_cache.nslots:
            l2.depends, l2.barrier = s.l2_cache.depends, s.l2_cache.barrier
            # (the C path and the subsystems find the cache through the state;
            # Mapping keeps its own reference)
            s.l2_cache = self.mapping.l2_cache = l2

    # -- internal snapshots (engine/snapshot_ops.py) ----------------------------------------

    def _snapshot_ops(self):
        from .snapshot_ops import Snapshots
        ops = getattr(self, "_snapshots_ops", None)
        if ops is None:
            ops = self._snapshots_ops = Snapshots(self)
        return ops

    def create_snapshot(self, name: str, *, id: str | None = None,
                        vm_state: Buffer | BinaryIO | int | None = None, vm_clock_nsec: int = 0,
                        icount: int | None = None, unique_name: bool = True) -> Snapshot:
        """Make the current disk an internal snapshot (qemu-img snapshot -c,
        savevm).  ``vm_state``: bytes or a readable binary file stored as
        the snapshot's VM state, or the size of what :meth:`write_vmstate`
        wrote.  ``id``: qemu's next free number unless given."""
        if self.state.external_data:
            datafile.refuse_snapshots(name)
        return self._update(self._snapshot_ops().create, name, id, vm_state, vm_clock_nsec,
                            icount, unique_name)

    def apply_snapshot(self, snapshot: str | collections.abc.Mapping[str, str | None]) -> None:
        """Revert the disk to a snapshot, by id or name (qemu-img snapshot -a)."""
        self._update(self._snapshot_ops().apply, snapshot)

    def delete_snapshot(self, snapshot: str | collections.abc.Mapping[str, str | None]) -> Snapshot:
        """Delete a snapshot, by id or name (qemu-img snapshot -d)."""
        return self._update(self._snapshot_ops().delete, snapshot)

    def rename_snapshot(self, snapshot: str | collections.abc.Mapping[str, str | None],
                        name: str) -> Snapshot:
        """Give a snapshot a new name."""
        return self._update(self._snapshot_ops().rename, snapshot, name)

    def write_vmstate(self, offset: int, data: Buffer) -> None:
        """Write VM state at ``offset`` of the active VM state area (qemu's
        savevm does this before creating the snapshot)."""
        self._update(self._snapshot_ops().write_vmstate, offset, data)
        if self.writethrough:
            self.flush()

    def read_vmstate(self, snapshot: Snapshot | str | None, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of a snapshot's VM state (a
        Snapshot, an id or a name), or of the active VM state area (None)."""
        from .snapshot import Snapshot as _Snapshot
        if snapshot is not None and not isinstance(snapshot, _Snapshot):
            snapshot = find_snapshot(self.snapshots, snapshot)
        if self.closed:
            raise ImageClosedError("I/O operation on a closed image")
        self._wrlock()
        try:
            return self._snapshot_ops().read_vmstate(snapshot, offset, length)
        finally:
            self._unlock()
