"""NBD exports as remote images (host/remote.py): a source of the block
cache (read-only), or ``NbdIO``, read and written straight through one
connection; and the connection kept between opens of one export within a
command (qemu-nbd without --persistent serves one)."""

import contextlib
import errno

from .remote_source import Source


# Inside a command (one_connection_per_export): an NBD connection whose image
# was closed, kept for the next open of the same name.  qemu-img opens an
# export once, and qemu-nbd serves one connection at a time (without
# --persistent, one in all), so probing the format and then opening the
# image must not take two.  At most one is kept; the rest are closed.
_idle_nbd = None


@contextlib.contextmanager
def one_connection_per_export():
    """While inside, closing an NBD image keeps its connection for the next
    open of the same export; on leaving, any kept one is closed."""
    global _idle_nbd
    _idle_nbd = {}
    try:
        yield
    finally:
        idle, _idle_nbd = _idle_nbd, None
        for client in idle.values():
            client.close()


def _nbd_client(url, opts):
    """(client, release) of an NBD export (nbd/client.py): the connection
    kept by the last image closed inside one_connection_per_export, or a new
    one; ``release()`` keeps it there again, or closes it."""
    from ..nbd.client import NbdClient
    key = (url, opts.nbd_context)
    client = (_idle_nbd or {}).pop(key, None) or NbdClient(url, opts.timeout,
                                                           opts.nbd_context)

    def release():
        if _idle_nbd is None:
            client.close()
            return
        for old in _idle_nbd.values():
            old.close()
        _idle_nbd.clear()
        _idle_nbd[key] = client
    return client, release


def nbd_source(url, opts):
    """An NBD export read through the block cache: one connection per
    source (the cache's parallel requests are in flight on it together)."""
    client, release = _nbd_client(url, opts)
    return Source(url, client.size, client.pread, release, lambda: nbd_source(url, opts),
                  client.readinto, client.block_status)


class NbdIO:
    """An NBD export opened for writing: reads and writes straight through
    one connection, no cache (the engine's table caches are above it), the
    export a fixed-size device (hookfile.HookFile's writable mode)."""

    def __init__(self, url, opts):
        self.name = url
        self.client, self._release = _nbd_client(url, opts)
        if self.client.read_only:
            self._release()
            raise OSError(errno.EROFS, "the export is read-only", url)
        self.size = self.client.size
        c = self.client
        self.source = Source(url, c.size, c.pread, None, None, c.readinto, c.block_status)

    def readinto(self, buf, off):
        self.client.readinto(off, buf)

    def pwrite(self, buf, off):
        self.client.pwrite(buf, off)

    def write_zeroes(self, off, n):
        self.client.write_zeroes(off, n)

    def flush(self):
        self.client.flush()

    def drop_cache(self):
        pass

    def close(self):
        self._release()
