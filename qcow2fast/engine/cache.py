"""Metadata cache policy: sizes with qemu's rules and defaults, and the
cache-clean-interval timer.  The cache itself is ``_ext/cache.pyx``."""

import threading
import weakref

from .._ext.cache import TableCache
from ..errors import InvalidArgumentError

DEFAULT_L2_CACHE_MAX = 32 << 20          # qemu's default cap on Linux
DEFAULT_CACHE_CLEAN_INTERVAL = 600       # seconds, as qemu
MIN_L2_SLOTS = 2
MIN_REFCOUNT_CLUSTERS = 4                # qemu's MIN_REFCOUNT_CACHE_SIZE


def cache_sizes(virtual_size, cluster_size, l2_cache_size=None, refcount_cache_size=None,
                cache_size=None, l2_entry_bytes=8):
    """(L2 cache bytes, refcount cache bytes) by qemu's rules (read_cache_sizes
    in qcow2.c): by default the L2 cache maps the whole disk, up to 32 MiB,
    and the refcount cache holds 4 clusters; ``cache_size`` is a total that
    goes to the L2 cache first.  ``l2_entry_bytes``: 16 with extended L2."""
    needed = -(-virtual_size // cluster_size) * l2_entry_bytes
    max_l2 = -(-needed // cluster_size) * cluster_size
    min_refcount = MIN_REFCOUNT_CLUSTERS * cluster_size
    if cache_size is not None:
        if l2_cache_size is not None and refcount_cache_size is not None:
            if l2_cache_size + refcount_cache_size > cache_size:
                raise InvalidArgumentError("l2-cache-size + refcount-cache-size may not "
                                           "exceed cache-size")
        elif l2_cache_size is not None:
            if l2_cache_size > cache_size:
                raise InvalidArgumentError("l2-cache-size may not exceed cache-size")
            refcount_cache_size = cache_size - l2_cache_size
        elif refcount_cache_size is not None:
            if refcount_cache_size > cache_size:
                raise InvalidArgumentError("refcount-cache-size may not exceed cache-size")
            l2_cache_size = cache_size - refcount_cache_size
        elif cache_size >= max_l2 + min_refcount:
            l2_cache_size, refcount_cache_size = max_l2, cache_size - max_l2
        else:
            refcount_cache_size = min(cache_size, min_refcount)
            l2_cache_size = cache_size - refcount_cache_size
    if l2_cache_size is None:
        l2_cache_size = min(max_l2, DEFAULT_L2_CACHE_MAX)
    if refcount_cache_size is None:
        refcount_cache_size = min_refcount
    return l2_cache_size, refcount_cache_size


def cache_budget(virtual_size, cluster_size, slice_bytes, options, l2_entry_bytes, chained):
    """(L2 cache bytes, refcount cache bytes, the chain's resolved-map bytes
    or None) for a disk of ``virtual_size`` bytes, from the cache options
    the image was opened with, ``options`` = (l2_cache_size,
    refcount_cache_size, cache_size): :func:`cache_sizes`, with
    l2-cache-size the whole chain's budget when ``chained``
    (engine/chain.py, chain_budget).  Computed at open and again after a
    resize, as qemu's read_cache_sizes is."""
    l2_bytes, rc_bytes = cache_sizes(virtual_size, cluster_size, *options,
                                     l2_entry_bytes=l2_entry_bytes)
    if not chained:
        return l2_bytes, rc_bytes, None
    from .chain import chain_budget     # (chain.py imports this module)
    l2_bytes, map_bytes = chain_budget(l2_bytes, options[0] is not None or options[2] is not None)
    return max(l2_bytes, slice_bytes), rc_bytes, map_bytes


def cache_slots(l2_bytes, rc_bytes, slice_bytes, cluster_size):
    """(L2 cache slots, refcount cache slots) for those byte budgets
    (``slice_bytes``: the bytes of one L2 cache entry, a slice of a table)."""
    return (max(MIN_L2_SLOTS, l2_bytes // slice_bytes),
            max(MIN_REFCOUNT_CLUSTERS, rc_bytes // cluster_size))


def make_caches(file, slice_bytes, cluster_size, l2_bytes, rc_bytes):
    """(L2 cache, refcount cache): empty TableCaches of those budgets."""
    n_l2, n_rc = cache_slots(l2_bytes, rc_bytes, slice_bytes, cluster_size)
    return (TableCache(file, n_l2, slice_bytes, True),
            TableCache(file, n_rc, cluster_size, False))


class CacheCleaner:
    """Every ``interval`` seconds, drop cache entries not used since the
    previous tick and give their memory back (qemu's cache-clean-interval).
    Holds the image only weakly, so an abandoned image can still be freed."""

    def __init__(self, image, interval):
        self._image = weakref.ref(image)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qcow2fast-cache-clean",
                                        daemon=True)
        self._thread.start()

    def _run(self):
        marks = (0, 0)
        while not self._stop.wait(self._interval):
            img = self._image()
            if img is None or img.closed:
                return
            marks = img._clean_caches(marks)
            del img

    def stop(self):
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
