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


def make_caches(file, virtual_size, cluster_size, l2_entry_size, l2_cache_size=None,
                refcount_cache_size=None, cache_size=None, l2_entry_bytes=8):
    """(L2 cache, refcount cache) TableCaches sized by :func:`cache_sizes`
    (``l2_entry_size``: the bytes of one cache entry, a slice of a table)."""
    l2_cache_size, refcount_cache_size = cache_sizes(virtual_size, cluster_size, l2_cache_size,
                                                     refcount_cache_size, cache_size,
                                                     l2_entry_bytes)
    l2 = TableCache(file, max(MIN_L2_SLOTS, l2_cache_size // l2_entry_size), l2_entry_size, True)
    rc = TableCache(file, max(MIN_REFCOUNT_CLUSTERS, refcount_cache_size // cluster_size),
                    cluster_size, False)
    return l2, rc


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
