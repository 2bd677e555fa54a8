# cython: language_level=3
"""Files whose requests pass through Python: ``HookFile``, a
:class:`~qcow2fast._ext.fileio.File` whose bytes come from a Python object
instead of a descriptor (a remote image, host/remote.py; read-only, or an
NBD export written through its connection), and
``DebugFile``, a local file whose requests a blkdebug rule set may fail
(host/blkdebug.py).

The engine reads every host byte through ``File.c_pread`` (the data path,
the table caches, the chain); this subclass overrides it to take the GIL
and call ``reader.readinto(buf, offset)``, so nothing above it changes and
no second copy of the data path exists.  The reader batches (block cache,
readahead, parallel ranged requests), which is what keeps the per-call
GIL toll small next to the network.

The descriptor is ``NO_FD``: never a valid descriptor (Linux caps them at
fs.nr_open, at most 2**31 - 64), so a caller that still reaches for
``fd`` (lseek, fstat, io_uring) fails with EBADF instead of touching
another file.  A reader error is kept and re-raised as it was (it names
the URL and the offset) by ``raise_errno``, which every caller of
``c_pread`` uses.
"""

from cpython.buffer cimport PyBUF_WRITABLE
from libc.stdint cimport int64_t

from .fileio cimport File
from .fileio cimport NO_FD as C_NO_FD

NO_FD = C_NO_FD
cdef int64_t EIO = 5
cdef int64_t EROFS = 30
cdef int64_t ENOSPC = 28


cdef class HookFile(File):
    cdef readonly object reader          # readinto(buf, offset), size, close(), name
    cdef object error                   # the reader's exception, for raise_errno
    cdef bint growable                  # writable, and the reader grows (truncate)

    cdef int64_t c_pread(self, char *buf, size_t n, int64_t off) noexcept nogil:
        with gil:
            try:
                self.reader.readinto(<char[:n]> buf if n else bytearray(), off)
            except BaseException as e:
                self.error = e
                return -EIO
        return <int64_t>n

    cdef int64_t c_pwrite(self, const char *buf, size_t n, int64_t off) noexcept nogil:
        if not self.writable:
            return -EROFS
        with gil:
            try:
                self.reader.pwrite(<const char[:n]> buf if n else b"", off)
            except BaseException as e:
                self.error = e
                return -EIO
            self.unsynced = True
        return <int64_t>n

    cdef raise_errno(self, int64_t rc, str what, int64_t off):
        e, self.error = self.error, None
        if e is not None:
            raise e
        File.raise_errno(self, rc, what, off)

    def close(self):
        if self.fd >= 0 or self.suspended:
            self.fd = -1
            self.suspended = False
            self.reader.close()

    # A deep chain gives descriptors back (engine/chain.py): a hook file has
    # none, but it drops its cached blocks the same way.
    def suspend(self):
        if self.fd >= 0:
            self.fd = -1
            self.suspended = True
            self.reader.drop_cache()

    def resume(self):
        if self.fd < 0 and self.suspended:
            self.fd = NO_FD
            self.suspended = False

    def sync(self):
        if self.writable and self.unsynced:
            self.unsynced = False
            self.reader.flush()

    def sync_all(self):
        self.sync()

    def size(self):
        return self.reader.size

    # Writable, the file is a device (a fixed size, holding what it held),
    # unless the reader is growable: then a file (writes past its end grow it).
    @property
    def is_device(self):
        return self.writable and not self.growable

    def truncate(self, int64_t size):
        if self.growable:
            self.reader.truncate(size)
            self.unsynced = True
        else:
            self._within(size)

    def punch_hole(self, int64_t off, int64_t length):
        return False

    def zero_range(self, int64_t off, int64_t length):
        if not self.writable:
            return False
        self._within(off + length)
        self.reader.write_zeroes(off, length)
        self.unsynced = True
        return True

    def fallocate(self, int64_t off, int64_t length):
        if self.growable and off + length > self.reader.size:
            self.truncate(off + length)
        else:
            self._within(off + length)

    def _within(self, int64_t end):
        if not self.writable:
            raise PermissionError(f"{self.path}: file is open read-only")
        if end > self.reader.size and not self.growable:
            raise OSError(ENOSPC, f"a remote device cannot grow: {end} bytes are needed "
                          f"and it has {self.reader.size}", self.path)


def hook_file(reader, bint writable=False):
    """A File over ``reader`` (an object with ``readinto(buf, offset)``
    filling all of ``buf``, ``size``, ``name``, ``close()`` and
    ``drop_cache()``; ``writable``: also ``pwrite(buf, offset)``,
    ``write_zeroes(offset, length)`` and ``flush()``, and with ``growable``
    true ``truncate(size)``, writes past its end growing it)."""
    cdef HookFile f = HookFile.__new__(HookFile, None)
    f.reader = reader
    f.path = reader.name
    f.fd = NO_FD
    f.writable = writable
    f.growable = writable and getattr(reader, "growable", False)
    return f


# host/blkdebug.py's request types.
cdef int IO_READ = 0, IO_WRITE = 1, IO_WRITE_ZEROES = 2, IO_DISCARD = 3, IO_FLUSH = 4


cdef class DebugFile(File):
    """A file under qemu's blkdebug filter: each request first asks
    ``rules.check(offset, nbytes, iotype)`` (under the GIL: a debugging
    driver, not a fast one) and fails with the errno it answers.  The
    engine's data paths keep to ``c_pread``/``c_pwrite`` for it (its
    image's data funnel, ImageState.debug)."""
    cdef readonly object rules

    cdef int64_t _refused(self, int64_t off, size_t n, int iotype) noexcept nogil:
        with gil:
            return self.rules.check(off, n, iotype)

    cdef int64_t c_pread(self, char *buf, size_t n, int64_t off) noexcept nogil:
        cdef int64_t err = self._refused(off, n, IO_READ)
        return -err if err else File.c_pread(self, buf, n, off)

    cdef int64_t c_pwrite(self, const char *buf, size_t n, int64_t off) noexcept nogil:
        cdef int64_t err = self._refused(off, n, IO_WRITE)
        return -err if err else File.c_pwrite(self, buf, n, off)

    def debug_event(self, str name):
        self.rules.event(name)

    def sync(self):
        if self.unsynced:       # (qemu's flush reaches the driver only after a write)
            self.rules.fail(0, 0, IO_FLUSH, self.path)
        File.sync(self)

    def punch_hole(self, int64_t off, int64_t length):
        self.rules.fail(off, length, IO_DISCARD, self.path)
        return File.punch_hole(self, off, length)

    def zero_range(self, int64_t off, int64_t length):
        self.rules.fail(off, length, IO_WRITE_ZEROES, self.path)
        return File.zero_range(self, off, length)


def debug_file(path, rules, bint writable=False, bint direct=False):
    """``path`` opened as a :class:`DebugFile` under ``rules``
    (host/blkdebug.Rules)."""
    cdef DebugFile f = DebugFile(path, writable, direct)
    f.rules = rules
    return f
