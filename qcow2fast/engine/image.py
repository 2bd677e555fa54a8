"""The Image: opening an image, and the public API over its engine
(qemu's qcow2.c: qcow2_open, the request entry points, flush, close).

An open image is one :class:`~qcow2fast._ext.state.ImageState` (file,
header, geometry, caches, metadata map, disk size, modes, host-space
markers) and the subsystems given that state, wired here once:

- ``mapping``   engine/mapping.py    the L1 table and L2 tables
- ``refcounts`` engine/refcount.py   refcounts and the cluster allocator (r+ only)
- ``clusters``  engine/cluster.py    the Python half of the data path
                                     (with ``subcluster.py`` and ``compressed.py``)
- ``flusher``   engine/flush.py      the ordered flush
- ``backing``   engine/backing.py    the image below, read through its own C path
- ``dirty_bitmaps`` engine/bitmap.py persistent dirty bitmaps (write observers)

The C half of the data path is the Cython base class ``ImageCore``
(``_ext/core.pyx``): a cached read or in-place overwrite is one call that
never enters Python.  It hands the rest to this class through the hooks
declared in ``_ext/core.pxd``; each runs the subsystem under the image's
exclusive lock.  The lifecycle methods (image_lifecycle.py), the
compressed-write ones (image_compressed.py) and the read-outs of the
header and state (image_info.py) are mixins over the same state.
"""

from __future__ import annotations

import collections.abc
import os
import threading
import warnings
from typing import TYPE_CHECKING, Any, Literal

from .._ext.core import ImageCore
from .._ext.state import CACHE_MODES, ZERO_FROM_NEVER, ImageState
from ..errors import (CorruptImageError, ImageClosedError, InvalidArgumentError,
                      ReadOnlyImageError, RepairError, RepairWarning)
from ..extent import Extent, merge_extents
from ..host.file import open_image_file
from ..host.quorum import check_image as check_quorum_image
from ..spec.datafile import data_file_name
from ..host.remote import is_remote
from ..host.remote import name_of as remote_name
from ..spec import header as hdr
from ..spec.geometry import Geometry
from . import datafile, features, untrusted
from .bitmap import Bitmaps
from .cache import DEFAULT_CACHE_CLEAN_INTERVAL, CacheCleaner, cache_budget, make_caches
from .chain import Chain, ChainBelow, build_chain, open_chain
from .cluster import Clusters
from .flush import FlushOrder
from .image_compressed import CompressedWriteAPI
from .image_info import ImageInfoAPI
from .image_lifecycle import LifecycleAPI
from .secret import ChainSecrets, Secret
from .mapping import NO_HOST_LIMIT, Mapping, read_l1_table
from .overlap import MetadataMap
from .refcount import Refcounts
from .snapshot import TableRepairs, find_snapshot, read_snapshot_table, snapshot_l1

if TYPE_CHECKING:
    from ..host.raw import RawImage
    from .rawio import ImageFile
    from . import crypto



class Image(LifecycleAPI, CompressedWriteAPI, ImageInfoAPI, ImageCore):
    """An open qcow2 image.  Use :func:`qcow2fast.open` to get one."""

    def __init__(self, path: str | os.PathLike[str], mode: Literal["r", "r+"] = "r", *,
                 cache_mode: str = "writeback", l2_cache_size: int | None = None,
                 l2_cache_entry_size: int | None = None, refcount_cache_size: int | None = None,
                 cache_size: int | None = None, cache_clean_interval: int | None = None,
                 lazy_refcounts: bool | None = None, backing: bool = True,
                 snapshot: str | collections.abc.Mapping[str, str | None] | None = None,
                 force_share: bool = False, locking: bool = True, untrusted: bool = False,
                 max_chain_depth: int | None = None, remote: dict | None = None,
                 data_file: str | os.PathLike[str] | None = None,
                 key_secret: bytes | str | Secret | ChainSecrets
                 | collections.abc.Mapping[int | str, bytes | str] | None = None,
                 no_io: bool = False, blkdebug: Any = None, data_file_blkdebug: Any = None,
                 quorum: Any = None,
                 _chain: tuple[str, ...] = (), _repair: bool = False) -> None:
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
        if cache_clean_interval is not None and cache_clean_interval > 0xFFFFFFFF:
            raise InvalidArgumentError("Cache clean interval too big")     # (qemu's words)
        # A URL or an open fsspec file: a remote image (host/remote.py, read-only).
        self.path = remote_name(path) if is_remote(path) else os.fspath(path)
        self.remote_options = remote
        self.cache_mode = cache_mode
        # qemu's image locks (host/lock.py), and the untrusted-image rules
        # (engine/untrusted.py); the backing chain inherits all three.
        self.force_share, self.locking, self.untrusted = force_share, locking, untrusted
        # The passphrase of an encrypted image: one (also that of every
        # encrypted layer below it), or one per layer (a mapping: depth or
        # file name -> passphrase, engine/secret.ChainSecrets); no_io: open
        # an encrypted image without it, data unreadable.
        self._chain_secrets, inherited = None, False
        if isinstance(key_secret, collections.abc.Mapping):
            key_secret = ChainSecrets(key_secret)
        if isinstance(key_secret, ChainSecrets):
            self._chain_secrets = key_secret
            inherited = key_secret.inherited(0, self.path)
            key_secret = key_secret.get(0, self.path)
        self.key_secret = None if key_secret is None else Secret(key_secret)
        # (a passphrase given for the whole chain, not for this layer: legacy
        # AES, which cannot tell a wrong one, does not take it -- as qemu)
        self._secret_inherited = inherited
        self.no_io = no_io
        self.encryption: crypto.Encryption | None = None
        self._close_lock = threading.Lock()     # serialises close() against the cleaner
        self._cleaner: CacheCleaner | None = None
        self.backing: Image | RawImage | None = None
        self.chain: Chain | None = None         # the layers below (owned by the top image)
        self._chain_index = -1                  # this image's layer in a chain it is part of
        self._max_chain_depth = max_chain_depth
        self._data_file_override = data_file    # qemu's data-file open option
        self._data_file_blkdebug = data_file_blkdebug   # (and a blkdebug filter over it)
        # The image on a quorum node (host/quorum.py; ``path`` is its name):
        # no directory for names relative to it, as in qemu.
        self._quorum = quorum
        self.data_file_name: str | None = None  # the external data file, as qemu names it
        writable = mode == "r+"
        direct = cache_mode in ("none", "directsync")
        try:
            # (blkdebug: the rules of qemu's error-injection filter over the
            # image file, host/blkdebug.py; the engine announces its events)
            f = open_image_file(path if is_remote(path) else self.path, "qcow2",
                                writable=writable, direct=direct, force_share=force_share,
                                locking=locking, remote=remote, blkdebug=blkdebug,
                                quorum=quorum)
        except OSError as e:
            if direct and e.errno == 22:
                raise InvalidArgumentError(f"{self.path}: the filesystem does not support "
                                           f"O_DIRECT (cache mode {cache_mode})") from None
            raise
        try:
            self._open(f, writable, l2_cache_entry_size, (l2_cache_size, refcount_cache_size,
                                                          cache_size),
                       cache_clean_interval, lazy_refcounts, backing, snapshot, _chain,
                       _repair and writable)
        except BaseException:
            if self.chain is not None:
                self.chain.close()
            state = getattr(self, "state", None)
            if state is not None and state.external_data:
                state.data_file.close()
            f.close()
            raise

    # -- opening ----------------------------------------------------------------

    def _repair_dirty(self):
        """check -r all of this image, before its state is read; the lines
        qemu prints meanwhile go out as a RepairWarning."""
        from ..fsck.repair import repair_dirty
        res = repair_dirty(self.path)
        warnings.warn(RepairWarning(
            f"{self.path}: the image was dirty (written with lazy refcounts, or a snapshot "
            f"operation, and not closed); checked and repaired as qemu does "
            f"({res.leaks_fixed} leaks and {res.corruptions_fixed} corruptions fixed)",
            res.messages), stacklevel=4)

    def _open(self, f, writable, l2_cache_entry_size, cache_sizes, cache_clean_interval,
              lazy_refcounts, backing, snapshot, chain, repair):
        file_size = f.size()
        h = hdr.read_header(f, file_size)
        if self.untrusted:
            untrusted.check_image(self.path, h, len(chain))
        hdr.check_features(h, writable)
        if self._quorum is not None:
            check_quorum_image(self.path, (h.backing_file if backing else None, None if
                                           self._data_file_override is not None
                                           else data_file_name(h)),
                               writable and h.incompatible_features & hdr.INCOMPAT_DIRTY)
        if writable and h.incompatible_features & hdr.INCOMPAT_DIRTY and not repair and not (
                h.incompatible_features & hdr.INCOMPAT_CORRUPT):
            # Interrupted with lazy refcounts: repaired first, as qemu does
            # (its check -r all; the file is read again after it).  Not when
            # the repair itself opens it (the snapshot table's rewrite): that
            # repair clears the dirty bit when it is done.
            self._repair_dirty()
            file_size = f.size()
            h = hdr.read_header(f, file_size)
            if h.incompatible_features & hdr.INCOMPAT_DIRTY:
                raise RepairError(f"{self.path}: Could not repair dirty image: corruptions "
                                  "remain (qemu-img check -r all says which)")
        why = None
        if h.incompatible_features & hdr.INCOMPAT_CORRUPT and writable:
            # qemu refuses to write a corrupt image; it stays readable.
            writable = False
            why = "image is marked corrupt (repair it with check -r all)"
        cs = h.cluster_size
        entry_size = l2_cache_entry_size or cs
        if entry_size & (entry_size - 1) or not 512 <= entry_size <= cs:
            raise InvalidArgumentError(f"l2_cache_entry_size must be a power of two between "
                                       f"512 and the cluster size ({cs})")
        geo = Geometry(h.cluster_bits, h.refcount_order, entry_size,
                       extended_l2=h.incompatible_features & hdr.INCOMPAT_EXTL2)
        s = ImageState(self.path, f, h, geo, self.cache_mode, not writable)
        self._attach(s)
        s.read_only_why = why
        s.metadata = MetadataMap((file_size + cs - 1) // cs, s.set_metadata_bitmap)
        s.metadata.add(0)
        self.snapshots, self.snapshot_table_bytes = read_snapshot_table(
            f, h, TableRepairs(True) if repair else None)
        if h.nb_snapshots:
            s.metadata.add(h.snapshots_offset >> geo.cluster_bits,
                           geo.size_to_clusters(self.snapshot_table_bytes))
        # A snapshot is viewed read-only through its own L1 table.  Like qemu's
        # load_tmp, the view keeps the image's current virtual size.
        if snapshot is None:
            l1 = read_l1_table(f, h.l1_table_offset, h.l1_size, cs, file_size)
        else:
            s.snapshot = find_snapshot(self.snapshots, snapshot)
            l1 = snapshot_l1(f, s.snapshot, cs, file_size)
        chained = bool(h.backing_file and backing)
        # (kept: a resize recomputes the cache sizes from them, as qemu)
        self._cache_options = cache_sizes
        l2_bytes, rc_bytes, map_bytes = cache_budget(h.size, cs, entry_size, cache_sizes,
                                                     geo.l2_entry_bytes, chained)
        s.l2_cache, s.refcount_cache = make_caches(f, entry_size, cs, l2_bytes, rc_bytes)
        # Host bytes at or past zero_from read as zeros: past the end of a
        # file, nowhere on a block device (it holds whatever it held).
        s.zero_from = file_size if not f.is_device else ZERO_FROM_NEVER
        s.alloc_end = file_size
        s.host_limit = -(-file_size // cs) * cs
        data_file = datafile.open_data_file(
            self.path, h, self._data_file_override, writable=writable,
            direct=self.cache_mode in ("none", "directsync"), force_share=self.force_share,
            locking=self.locking, untrusted=self.untrusted, no_io=self.no_io,
            blkdebug=self._data_file_blkdebug)
        if data_file is not None:
            s.set_data_file(data_file, datafile.HOST_LIMIT)
            self.data_file_name = datafile.display_name(self.path, h, self._data_file_override)
        # (after zero_from: a transform means no host byte reads as zero)
        if h.crypt_method or any(e.type == hdr.EXT_CRYPTO for e in h.other_extensions):
            # (imported here: hashlib and the LUKS code cost every plain
            # image's command start-up ~5-15 ms)
            from . import crypto
            self.encryption = crypto.attach(s, f, file_size, self.key_secret, self.no_io,
                                            self._secret_inherited)
        self.mapping = Mapping(s, l1)
        self.refcounts = Refcounts(s, file_size, repair=repair) if writable else None
        # The lazy-refcounts open option overrides the header's bit, as in qemu.
        if lazy_refcounts and h.version < 3:
            raise InvalidArgumentError("lazy refcounts require compat=1.1 or later")
        s.lazy_refcounts = bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS) \
            if lazy_refcounts is None else bool(lazy_refcounts)
        if not s.lazy_refcounts:
            s.l2_cache.depends = s.refcount_cache
        below = None
        if chained:
            layers, unit_bits, max_open = open_chain(self, self._max_chain_depth, chain)
            self.chain = build_chain(self, layers, unit_bits, max_open, map_bytes)
            self.backing = layers[0]
            below = ChainBelow(self.chain, 0)
        self.clusters = Clusters(s, self.mapping, self.refcounts, below,
                                 self._fast_read_locked, self._overlap_found)
        self.flusher = FlushOrder(s, self.mapping, self.refcounts, self.clusters.compressed)
        if writable and not s.unsafe:
            s.l2_cache.barrier = self.flusher.data_barrier   # data before the L2 entries (flush.py)
        self._core_setup(self.refcounts, self.chain.core if self.chain else None, 0,
                         self._read_slow, self._write_slow, self.flush, self._overlap_found)
        self.dirty_bitmaps = Bitmaps(s, self.refcounts, self)
        if writable:
            features.clear_autoclear(s, keep=hdr.AUTOCLEAR_BITMAPS | hdr.AUTOCLEAR_DATA_FILE_RAW)
            self.dirty_bitmaps.open_rw()
        features.update_alloc_fast(s)
        interval = DEFAULT_CACHE_CLEAN_INTERVAL if cache_clean_interval is None \
            else cache_clean_interval
        if interval and interval > 0:
            self._cleaner = CacheCleaner(self, interval)

    def _join_chain(self, chain: Chain, index: int, below: ChainBelow | None) -> None:
        """This image is layer ``index`` of ``chain`` (engine/chain.py): its
        reads of what lies below go through the layers under it."""
        self._chain_index = index
        self._chain_view = chain
        self.clusters.below = below
        self._set_chain(chain.core if below is not None else None, index + 1)
        self._set_resume(lambda: chain.resume(index))

    def secrets_below(self, k: int) -> ChainSecrets | None:
        """The ``key_secret`` to open the layer ``k`` below this image with
        (1: its backing file), for it and the layers under it."""
        if self._chain_secrets is not None:
            return self._chain_secrets.below(k)
        return None if self.key_secret is None else ChainSecrets.for_all(self.key_secret)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("r" if self.read_only else "r+")
        return f"<qcow2fast.Image {self.path!r} size={self.size} {state}>"

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the hooks of the C data path (core.pxd) ------------------------------------------

    def _wrlock_open(self):
        """The exclusive lock, with the image file open (a lower layer of a
        chain deeper than the descriptor limit may have given it back)."""
        self._wrlock()
        while self.file.closed and not self.closed:
            self._unlock()
            self._resume()
            self._wrlock()

    def _read_slow(self, offset, mv):
        self._wrlock_open()
        try:
            self.clusters.read(offset, mv)
        finally:
            self._unlock()

    def _write_slow(self, offset, mv):
        self._update(self.clusters.write, offset, mv)

    def _overlap_found(self, host):
        err = CorruptImageError(f"allocator returned host cluster {host:#x} which holds "
                                "metadata: refcounts are wrong", offset=host, field="refcount")
        features.mark_corrupt(self.state, err)
        raise err

    def _update(self, operation, *args):
        """Run a metadata-changing operation under the exclusive lock.
        Corruption found on the way marks the image corrupt (stopping
        further writes), as qemu does."""
        self._wrlock()
        try:
            self._check_writable()
            return operation(*args)
        except CorruptImageError as e:
            features.mark_corrupt(self.state, e)
            raise
        finally:
            self._unlock()

    def _check_writable(self):
        if self.closed:
            raise ImageClosedError("I/O operation on a closed image")
        if self.read_only:
            raise ReadOnlyImageError(self.state.read_only_reason())

    # -- zeroes, discard, compressed writes -----------------------------------------------

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """Make [offset, offset+length) read as zeros, without writing data
        where the format allows (v3 zero flag; v2 without a backing file
        deallocates)."""
        self._check_request(offset, length)
        self._notify_write(offset, length)
        self._update(self.clusters.write_zeroes, offset, length, may_unmap)
        if self.writethrough:
            self.flush()

    def discard(self, offset: int, length: int) -> None:
        """Discard whole clusters in [offset, offset+length): their host space
        is freed.  Afterwards they read as zeros (v3, or v2 without a backing
        file) or from the backing file (v2 with one)."""
        self._check_request(offset, length)
        self._notify_write(offset, length)
        self._update(self.clusters.discard, offset, length)
        if self.writethrough:
            self.flush()

    # -- block status ---------------------------------------------------------------------

    def block_status(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Extents of [offset, offset+length) through the whole backing chain."""
        if length is None:
            length = self.size - offset
        self._check_request(offset, length)
        self._wrlock_open()
        try:
            exts = list(self.clusters.layer_extents(offset, length, NO_HOST_LIMIT))
        finally:
            self._unlock()
        if self.chain is not None:
            return self.chain.block_status(0, exts)
        view = getattr(self, "_chain_view", None)
        if view is not None:                # a layer of a chain, read on its own
            return view.block_status(self._chain_index + 1, exts)
        return merge_extents(exts)

    def layer_status(self, offset: int, length: int) -> list[Extent]:
        """This layer's own extents of [offset, offset+length) (depth 0):
        "unallocated" where the layers below show through (commit and
        rebase walk a chain layer by layer with it)."""
        self._check_request(offset, length)
        self._wrlock_open()
        try:
            return list(self.clusters.layer_extents(offset, length))
        finally:
            self._unlock()

    # -- batches (_ext/batch.pyx) and asyncio (engine/aio.py) --------------------------------

    def submit(self, requests):
        """Carry out ``(op, offset, buffer)`` requests (op ``READ``/"read" fills
        the buffer, ``WRITE``/"write" writes it) as one batch, in C with the
        GIL released; they complete as if issued in order.  Returns per
        request its length or the exception it met."""
        from .._ext import batch    # imported on first use (start-up)
        return batch.submit(self, requests)

    def readv_into(self, offsets, buffers) -> int:
        """Fill each buffer from its guest offset, as one batch (raises the
        first error)."""
        from .._ext import batch
        return batch.readv_into(self, offsets, buffers)

    async def read_async(self, offset: int, length: int) -> bytes:
        """``read``, gathered with the other requests in flight into batches."""
        from . import aio       # asyncio only for those who use it (start-up)
        return await aio.read(self, offset, length)

    async def readinto_async(self, offset: int, buf) -> int:
        from . import aio       # asyncio only for those who use it (start-up)
        return await aio.readinto(self, offset, buf)

    async def write_async(self, offset: int, data) -> int:
        from . import aio       # asyncio only for those who use it (start-up)
        return await aio.write(self, offset, data)

    # -- flush and close --------------------------------------------------------------------

    def flush(self) -> None:
        """Make every completed write durable (per the cache mode)."""
        if self.closed:
            raise ImageClosedError("flush of a closed image")
        if self.read_only or self.state.unsafe:
            return
        self._wrlock()
        try:
            self.flusher.flush(sync=True)
        finally:
            self._unlock()

    def close(self) -> None:
        """Flush (without syncing under cache=unsafe), clear the dirty bit, and
        close the image and its backing chain."""
        with self._close_lock:
            if self.closed:
                return
            if self._cleaner is not None:
                self._cleaner.stop()
                self._cleaner = None
            s = self.state
            self._wrlock()
            try:
                if self.refcounts is not None and not s.read_only:
                    self.dirty_bitmaps.store()
                    # Under cache=unsafe nothing is synced, not even here (qemu).
                    self.flusher.flush(sync=not s.unsafe, final=True)
                    if features.is_dirty(s):
                        features.set_dirty(s, False)
                    s.trim_growth()     # (after the last barrier: a longer file is harmless)
            finally:
                s.closed = True         # (also when storing or flushing failed: the files go)
                self._unlock()
                if s.external_data:
                    s.data_file.close()
                s.file.close()
                if self.chain is not None:      # the top closes its chain's layers
                    self.chain.close()

    def _clean_caches(self, marks):
        """One tick of the cache cleaner: drop what was unused since
        ``marks`` (the caches' clocks at the previous tick); returns the new
        marks."""
        self._wrlock()
        try:
            self.l2_cache.drop_unused(marks[0])
            self.refcount_cache.drop_unused(marks[1])
            return (self.l2_cache.mark(), self.refcount_cache.mark())
        finally:
            self._unlock()

    def __del__(self):
        try:
            if not self.closed:
                self.close()
        except Exception:
            pass

    def as_file(self) -> ImageFile:
        """A seekable io.RawIOBase view of the guest disk."""
        from .rawio import ImageFile
        if self.closed:
            raise ImageClosedError("as_file() on a closed image")
        return ImageFile(self)

