"""Remote images through fsspec: ``https://``, ``s3://``, any fsspec URL,
or an fsspec file object already open, read-only; files on SSH servers by
qemu's ssh driver's names (``ssh://``: host/remote_ssh.py), read-only; and
NBD exports (``nbd://``, ``nbd+unix://``: nbd/client.py), which may also be
opened for writing (host/remote_nbd.py).

A remote image is a :class:`~qcow2fast._ext.hookfile.HookFile` (a File
whose reads call Python) over a :class:`BlockCache`, so the engine reads it
as it reads a local file.  The cache turns the engine's many small reads
(L2 slices, clusters) into few large ranged requests:

- the object is cut into blocks of ``block_size``; a read fetches the
  blocks it misses, and a run of missing blocks is one request (split at
  ``request_size``);
- a read that continues a recent one (a *stream*; several are tracked, so
  metadata reads elsewhere do not break the data stream) reads ahead once
  the stream has read ``request_size``, the window doubling up to
  ``readahead``; readahead is issued a request at a
  time, never a block at a time;
- requests run on ``connections`` threads in parallel, each one ranged
  request, so a large read is several connections at once: ``http(s)://``
  with the standard library's client straight into the cache's buffers
  (host/http.py: no fsspec, a fifth of its CPU), any other URL or open
  file through fsspec (``_fetch_range``, which every buffered fsspec file
  has);
- the blocks kept (fetched or in flight) are bounded by ``cache_size``,
  least recently used first out.

Bad servers: every response must be exactly the bytes asked for (a short
or long body is retried, then an error); a request that fails (timeout,
dropped connection, server error) is retried ``retries`` times in all with
a short backoff; a server that ignores Range, an object that changed (its
ETag no longer matches: HTTP ``If-Match``, S3 ``IfMatch``) or is gone is
an error at once.  Errors are :class:`RemoteReadError` naming the URL, the
offset and the cause; wrong data is never returned.

fsspec and its HTTP (aiohttp) and S3 (s3fs) back ends are the optional
extra ``remote``: ``pip install qcow2fast[remote]``; plain http(s) URLs
need none of it.
"""

import collections
import errno
import os
import posixpath
import re
import threading
import time
from dataclasses import dataclass, fields

from ..errors import InvalidArgumentError, UnsupportedFeatureError
from .remote_source import EXTRA, Source, optional

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class RemoteReadError(OSError):
    """A remote read that failed for good: ``filename`` is the URL,
    ``offset`` where the read started, ``strerror`` what went wrong."""

    def __init__(self, url, offset, length, why, code=errno.EIO):
        super().__init__(code, f"read of {length} bytes at offset {offset:#x}: {why}", url)
        self.offset = offset


@dataclass
class RemoteOptions:
    block_size: int = 256 << 10         # the cache's unit, and the smallest request
    cache_size: int = 128 << 20         # blocks kept, fetched or in flight
    readahead: int = 64 << 20           # largest readahead window of a stream
    request_size: int = 4 << 20         # largest single ranged request
    connections: int = 4                # requests in flight at once
    timeout: float = 30.0               # seconds without progress before a request fails
    retries: int = 3                    # attempts per request, the first included
    storage_options: dict = None        # passed to fsspec (credentials, endpoints, ...)
    http: str = "builtin"               # http(s) URLs: "builtin" (host/http.py) or "fsspec"
    # nbd:// URLs: the metadata context whose flags block status reports in
    # base:allocation's place (qemu's x-dirty-bitmap, e.g. qemu:dirty-bitmap:NAME)
    nbd_context: str = None

    @classmethod
    def of(cls, value):
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidArgumentError(f"remote options must be a dict, not {value!r}")
        names = {f.name for f in fields(cls)}
        bad = sorted(set(value) - names)
        if bad:
            raise InvalidArgumentError(f"unknown remote option(s) {', '.join(bad)} "
                                       f"(known: {', '.join(sorted(names))})")
        opts = cls(**value)
        for name in ("block_size", "cache_size", "readahead", "request_size", "connections",
                     "retries"):
            v = getattr(opts, name)
            if not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"remote option {name} must be a positive "
                                           f"integer, not {v!r}")
        if opts.http not in ("builtin", "fsspec"):
            raise InvalidArgumentError(f"remote option http must be 'builtin' or 'fsspec', "
                                       f"not {opts.http!r}")
        if opts.block_size & (opts.block_size - 1) or opts.block_size < 4096:
            raise InvalidArgumentError("remote option block_size must be a power of two "
                                       "of at least 4096")
        return opts


# -- names ---------------------------------------------------------------------------

def is_url(name):
    return isinstance(name, str) and _URL.match(name) is not None


def protocol_of(obj):
    """The lower-case scheme of a URL (``ssh``, ``nbd+unix``, ``https``...),
    None for anything else."""
    m = _URL.match(obj) if isinstance(obj, str) else None
    return m.group(1).lower() if m else None


def is_writable(obj):
    """Whether the remote image ``obj`` can be opened for writing: an
    ``ssh://`` file or an NBD export (the others are read-only)."""
    protocol = protocol_of(obj) or ""
    return protocol == "ssh" or protocol.startswith("nbd")


def is_remote(obj):
    """A URL, or an open file object (anything with read and seek that is
    not a path)."""
    return is_url(obj) or (not isinstance(obj, (str, bytes)) and hasattr(obj, "read")
                           and hasattr(obj, "seek"))


def name_of(obj):
    """The URL of a remote image (for messages and backing names)."""
    if isinstance(obj, str):
        return obj
    fs, path = getattr(obj, "fs", None), getattr(obj, "path", None)
    if fs is not None and isinstance(path, str):
        if is_url(path):
            return path
        return fs.unstrip_protocol(path)
    return str(getattr(obj, "name", None) or repr(obj))


def join(base, name):
    """Backing file ``name`` of the remote image at URL ``base``: a URL
    stays as it is; an absolute path is on the same host (or bucket), a
    relative one beside the image, as qemu resolves a local one."""
    if is_url(name):
        return name
    m = _URL.match(base)
    if m.group(1).lower() == "ssh" and "?" in base:
        raise InvalidArgumentError("Cannot generate a base directory with host_key_check set")
    rest = base[m.end():]
    host, _, path = rest.partition("/")
    if name.startswith("/"):
        path = name
    else:
        path = posixpath.join(posixpath.dirname("/" + path), name)
    return f"{m.group(0)}{host}{posixpath.normpath(path)}"


# -- opening ---------------------------------------------------------------------------

def create_file(url, options=None):
    """A new, empty remote file at ``url`` (an existing one emptied), open
    for writing as :func:`open_file` opens it: ``ssh://`` only (what
    qemu-img creates over a protocol; an NBD export has a fixed size)."""
    from .._ext.hookfile import hook_file
    if protocol_of(url) != "ssh":
        raise InvalidArgumentError(f"{name_of(url)}: only ssh:// files are created remotely")
    from .remote_ssh import SshIO
    return hook_file(SshIO(url, RemoteOptions.of(options), create=True), writable=True)




def open_file(obj, writable=False, options=None):
    """A File (``_ext/hookfile.pyx``) over the remote image ``obj`` (a URL
    or an open fsspec file): read-only through the block cache, or -- an NBD
    export opened for writing -- straight through its connection."""
    from .._ext.hookfile import hook_file
    name = name_of(obj)
    opts = RemoteOptions.of(options)
    if writable:
        if not is_writable(obj):
            raise InvalidArgumentError(f"{name}: remote images are read-only, but for NBD "
                                       "exports and ssh:// files (open them with mode 'r'; "
                                       "to write, create a local image over it)")
        if protocol_of(obj) == "ssh":
            from .remote_ssh import SshIO
            return hook_file(SshIO(obj, opts), writable=True)
        from .remote_nbd import NbdIO
        return hook_file(NbdIO(obj, opts), writable=True)
    source = _url_source(obj, opts) if isinstance(obj, str) else _object_source(obj, name)
    return hook_file(BlockCache(source, opts))


def read_head(obj, n, options=None):
    """The first ``n`` bytes of a remote image (format probing)."""
    f = open_file(obj, False, options)
    try:
        return f.pread(0, min(n, f.size()))
    finally:
        f.close()


def _url_source(url, opts, expect=None):
    protocol = _URL.match(url).group(1).lower()
    if protocol.startswith("nbd"):
        from .remote_nbd import nbd_source
        return nbd_source(url, opts)
    if protocol == "ssh":               # qemu's ssh driver (sftp:// stays fsspec's)
        from .remote_ssh import ssh_source
        return ssh_source(url, opts)
    so = dict(opts.storage_options or {})
    if protocol in ("http", "https") and opts.http == "builtin" and set(so) <= {"headers"}:
        return _http_source(url, opts, so.get("headers"), expect)
    fsspec = optional("fsspec", "remote images")
    try:
        if protocol in ("http", "https") and "client_kwargs" not in so:
            import aiohttp
            so["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(
                total=None, sock_connect=opts.timeout, sock_read=opts.timeout)}
        elif protocol in ("s3", "s3a") and "config_kwargs" not in so:
            so["config_kwargs"] = {"connect_timeout": opts.timeout,
                                   "read_timeout": opts.timeout,
                                   "retries": {"max_attempts": 1}}
        fs, path = fsspec.core.url_to_fs(url, **so)
    except ImportError as e:
        raise UnsupportedFeatureError(f"{url}: the {protocol}:// back end needs {e.name}: "
                                      f"{EXTRA}", feature="remote") from None
    except ValueError as e:         # fsspec: "Protocol not known: nbd" (a backing file name)
        raise UnsupportedFeatureError(f"{url}: {e}", feature="remote") from None
    info = _retrying(url, 0, 0, opts, lambda: fs.info(path), "metadata request")
    size = info.get("size")
    if size is None:
        raise RemoteReadError(url, 0, 0, "the server does not say how large the object is")
    kw = {}
    etag = info.get("ETag") or info.get("etag")
    if protocol in ("http", "https"):
        kw["size"] = size
        if etag and not etag.startswith("W/"):      # If-Match compares strong ETags only
            kw["headers"] = {"If-Match": etag}
    f = fs.open(path, "rb", cache_type="none", **kw)
    if getattr(f, "size", size) != size or (expect is not None and expect != (size, etag)):
        f.close()
        raise RemoteReadError(url, 0, 0, "the object changed since it was opened",
                              errno.ESTALE)
    return Source(url, size, f._fetch_range, f.close,
                  lambda: _url_source(url, opts, (size, etag)))


def _http_source(url, opts, headers, expect):
    """An http(s) URL read by host/http.py (the standard library's client)."""
    from .http import HttpObject
    obj = _retrying(url, 0, 0, opts, lambda: HttpObject(url, opts.timeout, headers, expect),
                    "metadata request")
    return Source(url, obj.size, None, obj.close,
                  lambda: _http_source(url, opts, headers, (obj.size, obj.etag)),
                  obj.fetch_into)


def _object_source(f, name):
    size = getattr(f, "size", None)
    if size is None or callable(size):
        size = f.seek(0, 2)
    if hasattr(f, "_fetch_range"):      # every fsspec buffered file
        return Source(name, size, f._fetch_range)
    lock = threading.Lock()

    def fetch(start, end):
        with lock:
            f.seek(start)
            return f.read(end - start)
    return Source(name, size, fetch)


# -- errors and retries -------------------------------------------------------------------

def _permanent(e):
    """(why, errno) if ``e`` will not go away by asking again, else None."""
    if getattr(e, "permanent", None):           # host/http.py's HTTPStatusError
        return e.strerror, e.permanent
    status = getattr(e, "status", None) or getattr(e, "code", None)
    text = str(e)
    if status == 412 or type(e).__name__ == "FileExpired" or "pre-condition" in text:
        return "the object changed since it was opened (its ETag no longer matches)", \
            errno.ESTALE
    if "support range requests" in text:
        return "the server does not support Range requests", errno.EOPNOTSUPP
    if isinstance(e, FileNotFoundError) or status == 404:
        return "the object is gone", errno.ENOENT
    if isinstance(e, PermissionError) or status in (401, 403):
        return f"access denied ({e})", errno.EACCES
    if isinstance(e, (InvalidArgumentError, UnsupportedFeatureError, TypeError,
                      AttributeError, NotImplementedError)):
        return _describe(e), errno.EINVAL
    return None


def _describe(e):
    if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
        return f"timed out ({type(e).__name__})"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _retrying(url, start, length, opts, call, what="read"):
    last = None
    for attempt in range(opts.retries):
        if attempt:
            time.sleep(min(0.05 * 4 ** (attempt - 1), 2.0))
        try:
            return call()
        except Exception as e:
            perm = _permanent(e)
            if perm is not None:
                raise RemoteReadError(url, start, length, perm[0], perm[1]) from e
            last = e
    raise RemoteReadError(url, start, length, f"{what} failed {opts.retries} times; last: "
                                              f"{_describe(last)}") from last


# -- the block cache ----------------------------------------------------------------------

class _Stream:
    __slots__ = ("pos", "window", "fetched", "seen")

    def __init__(self, pos, window, seen):
        self.pos, self.window, self.fetched, self.seen = pos, window, 0, seen


class _Request:
    """One ranged request: blocks [first, first + nblocks), its future, and
    the buffer the bytes land in (free buffers are reused by length).  ``held``: its blocks in the cache plus
    the reads copying from it; at 0, once fetched, the buffer is reused."""
    __slots__ = ("first", "nblocks", "future", "buf", "held")

    def __init__(self, first, nblocks, buf):
        self.first, self.nblocks, self.buf = first, nblocks, buf
        self.future, self.held = None, nblocks


class BlockCache:
    """The reader behind a remote HookFile (see the module's docstring).

    Buffers are reused (a fresh page costs a fault, zeroing, and in a VM
    whose host reclaims free memory a fault into the host): a request's
    buffer goes back to ``_free`` once none of its blocks is cached and no
    read copies from it (``_Request.held``, changed under the lock); the
    buffers kept free are bounded by ``free_max`` bytes."""

    MAX_STREAMS = 8

    def __init__(self, source, opts):
        self.source, self.opts = source, opts
        self.name, self.size = source.name, source.size
        self.block = opts.block_size
        self.nblocks = -(-self.size // self.block)
        self.max_blocks = max(4, opts.cache_size // self.block)
        self.req_blocks = max(1, opts.request_size // self.block)
        # Readahead never more than half the cache: what is read ahead must
        # still be there when the reader gets to it.
        self.ra_max = max(self.block, min(opts.readahead, opts.cache_size // 2))
        self.free_max = 2 * opts.connections * self.req_blocks * self.block
        self._blocks = collections.OrderedDict()     # block index -> its _Request
        self._free = {}                              # nblocks -> [free buffers]
        self._free_bytes = 0
        self._streams = []
        self._lock = threading.Lock()
        self._start_pool()
        self.requests = 0
        self.bytes_fetched = 0
        self.buffers_made = 0

    def _start_pool(self):
        self._pid = os.getpid()
        from concurrent.futures import ThreadPoolExecutor  # (not at import: CLI start-up)
        self._pool = ThreadPoolExecutor(self.opts.connections,
                                        thread_name_prefix="qcow2fast-remote")

    def _after_fork(self):
        """In a forked child (serve --fork) the pool's threads, the requests
        they ran and fsspec's event loop are gone: a new pool, nothing in
        flight, the object opened again (it must not have changed)."""
        self._clear()
        self._start_pool()
        if self.source.reopen is not None:
            self.source = self.source.reopen()
            return

        def refuse(start, end):
            raise InvalidArgumentError("an open file object cannot be read after fork "
                                       "(open the image by its URL)")
        self.source = Source(self.name, self.size, refuse)

    # -- the reader interface (HookFile) -----------------------------------------------

    def readinto(self, buf, off):
        """Fill ``buf`` from ``off`` (zeros past the end of the object)."""
        mv = memoryview(buf).cast("B")
        n = len(mv)
        lim = min(off + n, self.size)
        if lim < off + n:
            mv[max(0, lim - off):] = bytes(off + n - max(lim, off))
        if lim <= off:
            return
        bs = self.block
        b0, b1 = off // bs, -(-lim // bs)
        with self._lock:
            if self._pid != os.getpid():
                self._after_fork()
            reqs = self._schedule(b0, b1)
            self._read_ahead(off, lim, b1)
        try:
            for req in reqs:
                try:
                    req.future.result()
                except BaseException:
                    self._forget(req)
                    raise
                lo = max(off, req.first * bs)
                hi = min(lim, (req.first + req.nblocks) * bs)
                rel = req.first * bs
                mv[lo - off:hi - off] = req.buf[lo - rel:hi - rel]
        finally:
            with self._lock:
                for req in reqs:
                    self._release(req)

    def drop_cache(self):
        with self._lock:
            self._clear()

    def close(self):
        self.drop_cache()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.source.close()

    def stats(self):
        return {"remote_requests": self.requests, "remote_bytes": self.bytes_fetched,
                "remote_blocks_cached": len(self._blocks),
                "remote_buffers_made": self.buffers_made}

    # -- scheduling (under the lock) ---------------------------------------------------

    def _schedule(self, b0, b1):
        """The requests holding the blocks of [b0, b1), in order, each held
        for the caller's copy: the missing blocks are fetched, each run of
        them in requests of at most request_size."""
        self._fetch_missing(b0, b1)
        out = []
        for i in range(b0, b1):
            self._blocks.move_to_end(i)
            req = self._blocks[i]
            if not out or out[-1] is not req:
                req.held += 1
                out.append(req)
        self._evict()
        return out

    def _fetch_missing(self, i, end):
        """Request the blocks of [i, end) not cached or in flight."""
        while i < end:
            if i in self._blocks:
                i += 1
                continue
            j = i + 1
            while j < end and j - i < self.req_blocks and j not in self._blocks:
                j += 1
            length = min(j * self.block, self.size) - i * self.block
            free = self._free.get(length)
            if free:
                buf = free.pop()
                self._free_bytes -= length
            else:
                buf = memoryview(bytearray(length))
                self.buffers_made += 1
            req = _Request(i, j - i, buf)
            req.future = self._pool.submit(self._fetch, req)
            for k in range(i, j):
                self._blocks[k] = req
            i = j

    def _read_ahead(self, off, lim, b1):
        """Continue the stream this read belongs to (or start one)."""
        bs = self.block
        s = next((s for s in self._streams if s.pos - bs <= off <= s.pos + s.window), None)
        if s is None:
            self._streams.insert(0, _Stream(lim, min(self.ra_max, 4 * bs), lim - off))
            del self._streams[self.MAX_STREAMS:]
            return
        self._streams.remove(s)
        self._streams.insert(0, s)
        s.seen += max(0, lim - s.pos)
        s.pos = lim
        # A stream reads ahead once it has gone a request's worth forward:
        # a few neighbouring metadata reads (check's refcount blocks and
        # L2 tables) are not one.
        if s.seen < self.opts.request_size:
            return
        s.window = min(self.ra_max, 2 * s.window)
        end = min(self.nblocks, -(-(lim + s.window) // bs))
        start = max(s.fetched, b1)
        # Read ahead a request at a time (or what is left of the object).
        if end - start < min(self.req_blocks, max(1, (s.window // bs) // 2)) and \
                end < self.nblocks:
            return
        s.fetched = end
        self._fetch_missing(start, end)
        self._evict()

    def _evict(self):
        while len(self._blocks) > self.max_blocks:
            self._release(self._blocks.popitem(last=False)[1])

    def _release(self, req):
        """One hold on ``req`` less: a fetched request nobody holds gives its
        buffer back (a failed or unfinished one leaves it to the GC)."""
        req.held -= 1
        fut = req.future
        if req.held or not fut.done() or fut.cancelled() or fut.exception() is not None:
            return
        if self._free_bytes + len(req.buf) <= self.free_max:
            self._free.setdefault(len(req.buf), []).append(req.buf)
            self._free_bytes += len(req.buf)
        req.buf = None

    def _clear(self):
        """Nothing cached (buffers still held by reads are left to them)."""
        for req in self._blocks.values():
            req.held -= 1
        self._blocks.clear()
        self._streams.clear()

    def _forget(self, req):
        """A failed request's blocks leave the cache (a later read asks again)."""
        with self._lock:
            for i in range(req.first, req.first + req.nblocks):
                if self._blocks.get(i) is req:
                    del self._blocks[i]

    # -- one request (on a pool thread) ------------------------------------------------

    def _fetch(self, req):
        start = req.first * self.block
        want = len(req.buf)

        def once():
            with self._lock:
                self.requests += 1
            if self.source.fetch_into is not None:
                self.source.fetch_into(start, req.buf)
            else:
                data = self.source.fetch(start, start + want)
                if len(data) != want:
                    raise _ShortRead(f"the server sent {len(data)} bytes instead of {want}")
                req.buf[:] = data
            with self._lock:
                self.bytes_fetched += want
        _retrying(self.name, start, want, self.opts, once)


class _ShortRead(OSError):
    pass
