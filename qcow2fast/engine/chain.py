"""A backing chain of any depth (qemu's block.c: bdrv_open_backing_file in
a loop, without recursion): opening it layer by layer, its one
metadata-cache budget, the file-descriptor budget, and block status
through it.

The layers below the top are opened read-only and without a backing file
of their own; they share one :class:`~qcow2fast._ext.chain.ChainCore`,
which reads through them in C (``_ext/chain.pyx``) with the resolved
mapping cache (``_ext/resolved.pyx``).

Memory: ``l2_cache_size`` (or ``cache_size``) is the chain's total.  By
default the top keeps qemu's L2 cache for its disk and the resolved map
gets twice that (its entries are 16 bytes per unit, an L2 entry 8); given
a size, the top gets a third and the map the rest.  Each lower layer keeps
only MIN_L2_SLOTS small L2 slices (for resolving misses), whatever the
depth.

File descriptors: one per layer.  When the chain needs more than the
soft RLIMIT_NOFILE leaves, the soft limit is raised to the hard one; if
that is still too few, the layers' files are suspended (closed, reopened
on use) least recently used first, so at most ``max_open`` are open.
A file is suspended only under its layer's exclusive lock.
"""

import os
import resource
import threading

from .._ext.chain import ChainCore
from .._ext.core import ImageCore
from .._ext.resolved import ResolvedMap
from ..errors import (CorruptImageError, ImageClosedError, ImageLockedError, InvalidArgumentError,
                      LimitExceededError, Qcow2Error,
                      UnsupportedFeatureError)
from ..extent import Extent, merge_extents
from ..host.null import is_null_name
from ..host.raw import RawImage
from ..spec import header as hdr
from ..host import lock
from . import backing, untrusted
from ..host.remote import is_url
from .backing import (backing_format, identity, json_blkdebug_rules, probe_format, read_head,
                      resolve_backing_path)
from .cache import MIN_L2_SLOTS

LAYER_L2_ENTRY = 16384        # a lower layer's L2 slice (or its cluster size, if smaller)
FD_RESERVE = 64              # descriptors left for everything else (at most a quarter)


def chain_budget(l2_bytes, explicit):
    """(the top's L2 cache bytes, the resolved map's bytes) out of the
    chain's L2 budget ``l2_bytes`` (see the module's docstring)."""
    if explicit:
        top = max(1, l2_bytes // 3)
        return top, l2_bytes - top
    return l2_bytes, 2 * l2_bytes


def raise_fd_limit():
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft, hard


def _fds_in_use():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 16


def _in_layer(e, path, k, top):
    """``e`` again, its message naming the layer it came from (``qemu``:
    qemu-img's words, "Could not open backing file: " once per level, for
    "Could not open 'OPENING': " to precede)."""
    where = f"backing file {path!r} (layer {k} below {top!r})"
    if isinstance(e, OSError):
        return type(e)(e.errno, f"{where}: {e.strerror}", e.filename)
    new = type(e).__new__(type(e))
    Exception.__init__(new, f"{where}: {e}")
    new.__dict__.update(e.__dict__)
    new.layer = k
    new.qemu = "Could not open backing file: " * k + (getattr(e, "qemu", None) or str(e))
    new.opening = top
    return new


class Chain:
    """The layers below ``top``, opened (see open_chain)."""

    def __init__(self, top, layers, core, max_open):
        self.top_path = top.path
        self.layers = layers
        self.core = core
        self.max_open = max_open          # qcow2 layer files open at once (None: all)
        self._fd_lock = threading.Lock()
        self.suspends = 0
        core.resume = self.resume
        core.lazy = max_open is not None

    # -- descriptors ------------------------------------------------------------------

    def _qcow2_open(self):
        return sum(1 for l in self.layers if isinstance(l, ImageCore) and not l.file.closed)

    def _suspend_lru(self, keep):
        """Suspend the least recently used open layer file other than
        ``keep`` whose layer is idle; False if every one is busy."""
        clock = self.core.last_used_clock
        for j in sorted(range(len(clock)), key=clock.__getitem__):      # stable
            layer = self.layers[j]
            if j == keep or not isinstance(layer, ImageCore) or layer.file.closed:
                continue
            if layer._trywrlock():
                try:
                    layer.file.suspend()
                finally:
                    layer._unlock()
                self.suspends += 1
                return True
        return False

    def resume(self, j):
        """Reopen layer j's suspended file, suspending the least recently
        used one if the budget is spent.  Called with no layer lock held."""
        layer = self.layers[j]
        with self._fd_lock:
            if not layer.file.suspended:
                if layer.file.closed:
                    raise ImageClosedError(f"{layer.path}: the backing chain is closed")
                return
            while self._qcow2_open() >= self.max_open and self._suspend_lru(j):
                pass
            layer._wrlock()
            try:
                try:
                    layer.file.resume()
                except OSError as e:
                    if e.errno != 24 or not self._suspend_lru(j):     # EMFILE
                        raise _fd_error(self.top_path, len(self.layers)) from e
                    layer.file.resume()
                _relock(layer)
            finally:
                layer._unlock()

    def _locked(self, j):
        """Take layer j's exclusive lock with its file open."""
        layer = self.layers[j]
        while True:
            layer._wrlock()
            if not layer.file.closed:
                return layer
            layer._unlock()
            self.resume(j)

    # -- block status -------------------------------------------------------------------

    def layer_extents(self, j, offset, length):
        layer = self.layers[j]
        if not isinstance(layer, ImageCore):
            return layer.block_status(offset, length)
        self._locked(j)
        try:
            return list(layer.clusters.layer_extents(offset, length))
        finally:
            layer._unlock()

    def block_status(self, first, own):
        """Extents through the chain: ``own`` (an image's own extents,
        depth 0) with its unallocated ones resolved from layer ``first``
        down.  Depths as qemu-img map reports them: the layer that holds
        the data or zeros; for ranges unallocated all the way down, the
        deepest layer consulted (past a layer's end, the layer above it).
        Iterative: no recursion per layer."""
        n = len(self.layers)
        out = []
        stack = [iter([(e, first, 0) for e in own])]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                continue
            e, j, d = item
            if e.kind != "unallocated" or j >= n:
                out.append(e)
                continue
            end = e.offset + e.length
            lim = min(end, self.layers[j].size)
            sub = []
            if lim > e.offset:
                sub = [(x._replace(depth=d + 1), j + 1, d + 1)
                       for x in self.layer_extents(j, e.offset, lim - e.offset)]
            if lim < end:
                start = max(lim, e.offset)
                sub.append((Extent(start, end - start, "unallocated", None, d), n, d))
            stack.append(iter(sub))
        return merge_extents(out)

    # -- statistics and closing ----------------------------------------------------------

    def stats(self):
        c, rm = self.core, self.core.rmap
        return {"chain_layers": len(self.layers), "chain_open_layers": self._open_files(),
                "chain_suspends": self.suspends,
                "chain_map_bytes": rm.nbytes, "chain_map_blocks": rm.nslots,
                "chain_map_used": rm.used, "chain_map_hits": rm.hits,
                "chain_map_misses": rm.misses, "chain_layer_lookups": c.layer_lookups,
                "chain_walks": c.walks, "chain_layer_l2_bytes": sum(
                    l.l2_cache.nslots * l.l2_cache.slot_bytes for l in self.layers
                    if isinstance(l, ImageCore))}

    def _open_files(self):
        return sum(1 for l in self.layers if not l.file.closed)

    def invalidate(self, offset=0, length=None, changed=()):
        """The one entry point for whatever changes a lower layer (commit
        writing into it, rebase): the layers at indexes ``changed`` (0: the
        top's backing file) are reopened, so that their header, L1 table
        and cached L2 slices are read again, and what the chain resolved at
        guest [offset, offset+length) is forgotten.  Call it after the
        change, before the chain is read there again; a layer written
        through its own Image object here needs only the range."""
        with self._fd_lock:
            for j in changed:
                self._reopen(j)
        self.core.invalidate(offset, length)

    def _reopen(self, j):
        old = self.layers[j]
        if isinstance(old, ImageCore):
            new = _open_layer(type(old), old.path, old.cache_mode, _share(old), old.untrusted,
                              old.key_secret)
        else:
            new = RawImage(old.path, **_share(old))
        self.layers[j] = new
        self.core.replace_layer(j, new)
        if isinstance(new, ImageCore):
            below = j + 1 < len(self.layers)
            new._join_chain(self, j, ChainBelow(self, j + 1) if below else None)
            new.backing = self.layers[j + 1] if below else None
        if j > 0 and isinstance(self.layers[j - 1], ImageCore):
            self.layers[j - 1].backing = new
            self.layers[j - 1].clusters.below = ChainBelow(self, j)
        old.close()

    def close(self):
        for layer in self.layers:
            layer.close()


class ChainBelow:
    """What the Python half of an image's data path sees below it (the
    ``below`` of engine/cluster.py): the chain from layer ``first`` down."""

    def __init__(self, chain, first):
        self.core = chain.core
        self.first = first
        self.size = chain.layers[first].size

    def readinto(self, pos, buf):
        self.core.read_into(self.first, pos, buf)
        return len(buf)


def _fd_error(top, n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return LimitExceededError(
        f"backing chain of {top!r}: {n} layers, and the open-file limit (soft {soft}, hard "
        f"{hard}) leaves too few descriptors to open even two of them; raise it (ulimit -n)")


def _resolve_name(img, k):
    name = img.header.backing_file
    try:
        path = resolve_backing_path(img.path, name)
    except InvalidArgumentError as e:   # (no directory: an ssh:// name with host_key_check)
        e.opening, e.qemu = img.path, str(e)
        raise
    if ":" in name.split("/")[0] and not os.path.exists(path) and not is_url(path):
        raise UnsupportedFeatureError(f"backing file {name!r} of {img.path!r} (layer {k}): "
                                      "protocols are not supported", feature="backing protocol")
    return name, path


def open_chain(top, max_depth=None, above=()):
    """Open the layers of the backing chain below ``top`` (an Image whose
    header names a backing file), one after the other; returns (layers,
    the resolved map's unit bits, max_open: None or how many qcow2 layer
    files may be open at once).  ``above``: real paths of images
    above ``top`` (loop detection).  Errors name the layer and the field."""
    max_depth = backing.MAX_CHAIN_DEPTH if max_depth is None else max_depth
    if top.untrusted:
        max_depth = min(max_depth, untrusted.MAX_UNTRUSTED_CHAIN)
    where = hdr.FIELD_OFFSET["backing_file_offset"]
    seen = set(above) | {identity(top.path)}
    layers, img = [], top
    cache_mode = "none" if top.cache_mode in ("none", "directsync") else "writeback"
    fd_avail = None
    shown = top.path                    # img's name as qemu shows it
    try:
        while img.header is not None and img.header.backing_file:
            k = len(layers) + 1
            name, path = _resolve_name(img, k)
            shown = backing.qemu_name(shown, name)
            if identity(path) in seen:
                raise CorruptImageError(f"backing chain loops: {img.path!r} -> {name!r} is "
                                        "already in the chain", offset=where,
                                        field="backing_file")
            if len(seen) >= max_depth and top.untrusted:
                untrusted.check_image(img.path, img.header, len(seen))    # its own error
            if len(seen) >= max_depth:
                raise CorruptImageError(f"backing chain deeper than {max_depth} images at "
                                        f"{img.path!r} (max_chain_depth)", offset=where,
                                        field="backing_file")
            if is_null_name(path):
                raise UnsupportedFeatureError(
                    f"backing file {name!r} of {img.path!r} (layer {k}): qemu's null "
                    "protocol is not supported in a backing chain", feature="backing protocol")
            if not is_url(path) and not os.path.exists(path):
                e = FileNotFoundError(2, f"could not open backing file {name!r} of "
                                         f"{img.path!r} (layer {k}, field backing_file)", path)
                e.qemu = ("Could not open backing file: " * k
                          + f"Could not open '{shown}': No such file or directory")
                e.opening = top.path
                raise e
            fmt = (backing_format(img.header.backing_format, name)
                   or probe_format(path, top.remote_options))
            if fmt not in ("qcow2", "raw"):
                raise UnsupportedFeatureError(
                    f"backing file {name!r} of {img.path!r} (layer {k}): format {fmt!r} "
                    "(field backing_format) is not supported", feature="backing format")
            if fd_avail is None or _open_count(layers) >= fd_avail:
                fd_avail = _fd_budget(layers)
            if _open_count(layers) >= fd_avail and not _suspend_oldest(layers):
                raise _fd_error(top.path, k)
            share = _share(top)
            try:
                if fmt == "qcow2":
                    layer = _open_layer(type(top), path, cache_mode, share, top.untrusted,
                                        top.secrets_below(k), json_blkdebug_rules(name))
                else:
                    layer = RawImage(path, **share)
            except ImageLockedError as e:       # in qemu's words
                detail = f"Could not open backing file: {e.detail}"
                raise ImageLockedError(f"Could not open '{img.path}': {detail}", path=e.path,
                                       detail=detail) from None
            except (Qcow2Error, OSError) as e:
                raise _in_layer(e, path, k, top.path) from None
            layers.append(layer)
            seen.add(identity(path))
            img = layer
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    unit_bits = min([l.geo.unit_bits for l in layers if isinstance(l, ImageCore)] or [16])
    nraw = sum(1 for l in layers if not isinstance(l, ImageCore))
    lazy = any(l.file.suspended for l in layers)
    return layers, unit_bits, (max(2, fd_avail - nraw) if lazy else None)


def build_chain(top, layers, unit_bits, max_open, map_bytes):
    """Wire the opened layers: the shared ChainCore, each layer's place in
    it (its own reads go through the layers under it)."""
    rmap = ResolvedMap(top.file, unit_bits, map_bytes)
    core = ChainCore(layers, rmap)
    chain = Chain(top, layers, core, max_open)
    for j, layer in enumerate(layers):
        if isinstance(layer, ImageCore):
            below = j + 1 < len(layers)
            layer._join_chain(chain, j, ChainBelow(chain, j + 1) if below else None)
    for upper, lower in zip(layers, layers[1:]):
        if isinstance(upper, ImageCore):
            upper.backing = lower
    return chain


def _share(img):
    """The lock (and remote) options a layer takes: those of the image given."""
    return {"force_share": img.force_share, "locking": img.locking,
            "remote": img.remote_options}


def _open_layer(cls, path, cache_mode, share, untrusted, key_secret=None, blkdebug=None):
    """A lower layer: read-only, no backing file of its own, and a small L2
    cache (the chain's resolved map answers most reads); locked as the top
    is (``share``), and under the untrusted rules if the top is; an
    encrypted layer is unlocked with ``key_secret`` (the top's
    ``secrets_below`` this layer); ``blkdebug``: the rules of qemu's
    error-injection filter over its file (a json: backing name's)."""
    head = read_head(path, 24, share["remote"])
    bits = int.from_bytes(head[20:24], "big") if len(head) == 24 else 16
    entry = min(LAYER_L2_ENTRY, 1 << bits) if 9 <= bits <= 21 else LAYER_L2_ENTRY
    return cls(path, "r", cache_mode=cache_mode, cache_clean_interval=0, backing=False,
               l2_cache_entry_size=entry, l2_cache_size=MIN_L2_SLOTS * entry,
               untrusted=untrusted, key_secret=key_secret, blkdebug=blkdebug, **share)


def _open_count(layers):
    return sum(1 for layer in layers if not layer.file.closed)


def _fd_budget(layers):
    """Layer files that may be open at once, the soft limit raised if the
    chain needs it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    others = _fds_in_use() - _open_count(layers)
    avail = soft - others - min(FD_RESERVE, soft // 4)
    if avail <= len(layers) + 1 and soft < hard:
        soft, hard = raise_fd_limit()
        avail = soft - others - min(FD_RESERVE, soft // 4)
    if avail < 2:
        raise LimitExceededError(f"the open-file limit (soft {soft}, hard {hard}) leaves "
                                 f"{max(avail, 0)} descriptors for the backing chain; raise "
                                 "it (ulimit -n)")
    return avail


def _relock(layer):
    """A resumed layer file takes its qemu lock bytes again (closing the
    descriptor released them): a writer that came meanwhile makes the read
    fail with qemu's words rather than go on unprotected."""
    if layer.locking:
        perm, unshared = lock.permissions("qcow2", False, layer.force_share)
        try:
            lock.lock(layer.file.fd, layer.path, perm, unshared,
                      context=f"Could not reopen backing file '{layer.path}'")
        except BaseException:
            layer.file.suspend()
            raise


def _suspend_oldest(layers):
    """While opening (nothing reads the layers yet): give back the
    descriptor of the open qcow2 layer opened first."""
    for layer in layers:
        if isinstance(layer, ImageCore) and not layer.file.closed:
            layer.file.suspend()
            return True
    return False
