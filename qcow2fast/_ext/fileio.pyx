# cython: language_level=3
"""A host file behind the one small interface the image layer uses.

Every transfer runs with the GIL released.  With ``direct=True`` the file is
opened with O_DIRECT (cache modes none/directsync) and unaligned requests go
through an aligned bounce buffer.
"""

import os

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.errno cimport errno
from libc.stdint cimport uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy
from posix.unistd cimport close as c_close, fdatasync, fsync

from .common cimport QF_WRITE_MAX, qf_pread_full, qf_pwrite_full, qf_punch_hole, qf_zero_range

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

cdef extern from "qf_readfd.h" nogil:
    void qf_read_fds_init(int *slots)
    void qf_read_fds_close(int *slots)

cdef extern from "qf_cpulimit.h":
    int qf_install_cpu_limit_handler(const char *msg, size_t n)

cdef extern from "fcntl.h" nogil:
    int sync_file_range(int fd, int64_t offset, int64_t nbytes, unsigned int flags)
    unsigned int SYNC_FILE_RANGE_WRITE

DIRECT_ALIGN = 4096


def install_cpu_limit_handler(bytes message):
    """SIGXCPU ends the process with ``message`` on stderr and status 1,
    from C: it runs even while a long C call holds the GIL
    (host/limits.CpuGuard)."""
    if qf_install_cpu_limit_handler(message, len(message)) != 0:
        raise OSError(errno, os.strerror(errno))


cdef class File:
    def __cinit__(self, path, bint writable=False, bint direct=False, bint create=False):
        cdef int flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        if direct:
            flags |= os.O_DIRECT
        self.fd = -1
        qf_read_fds_init(self.read_fds)
        if path is None:        # no descriptor: a subclass does the I/O (_ext/hookfile.pyx)
            self.path = None
            return
        self.path = os.fspath(path)
        self.fd = os.open(self.path, flags | os.O_CLOEXEC, 0o644)
        self.flags = (flags | os.O_CLOEXEC) & ~(os.O_CREAT | os.O_TRUNC)
        self.writable = writable
        self.direct = direct
        self.align = DIRECT_ALIGN if direct else 1
        self.unsynced = create          # (a new file: its creation is not stable yet)

    def __dealloc__(self):
        qf_read_fds_close(self.read_fds)
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def close(self):
        qf_read_fds_close(self.read_fds)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def closed(self):
        return self.fd < 0

    # A suspended file gave its descriptor back (a backing chain deeper than
    # the descriptor limit); resume() reopens the same path with the same
    # flags.  The caller makes sure no one uses the file in between (the
    # image's exclusive lock).
    def suspend(self):
        qf_read_fds_close(self.read_fds)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.suspended = True

    def resume(self):
        if self.fd < 0 and self.suspended:
            self.fd = os.open(self.path, self.flags)
            self.suspended = False

    cdef raise_errno(self, int64_t rc, str what, int64_t off):
        err = <int>(-rc)
        raise OSError(err, f"{what} at offset {off:#x}: {os.strerror(err)}", self.path)

    cdef bint aligned(self, const void *buf, size_t n, int64_t off) noexcept nogil:
        cdef size_t a = <size_t>self.align
        return ((<uintptr_t>buf) % a == 0) and (n % a == 0) and (<size_t>off % a == 0)

    cdef int64_t c_pread(self, char *buf, size_t n, int64_t off) noexcept nogil:
        cdef int64_t a, start, end, rc
        cdef void *bounce = NULL
        if not self.direct or self.aligned(buf, n, off):
            return qf_pread_full(self.fd, buf, n, off)
        a = self.align
        start = off - off % a
        end = (off + <int64_t>n + a - 1) // a * a
        if posix_memalign(&bounce, a, end - start) != 0:
            return -12  # ENOMEM
        rc = qf_pread_full(self.fd, <char *>bounce, end - start, start)
        if rc >= 0:
            memcpy(buf, <char *>bounce + (off - start), n)
            rc = n
        free(bounce)
        return rc

    cdef int64_t c_pwrite(self, const char *buf, size_t n, int64_t off) noexcept nogil:
        # Unaligned O_DIRECT writes read-modify-write whole aligned blocks;
        # callers serialise them (they run under the image's exclusive lock).
        cdef int64_t a, start, end, rc
        cdef void *bounce = NULL
        if not self.direct or self.aligned(buf, n, off):
            rc = qf_pwrite_full(self.fd, buf, n, off, 0 if self.direct else QF_WRITE_MAX)
            self.unsynced = True        # (after the write: see fileio.pxd)
            return rc
        a = self.align
        start = off - off % a
        end = (off + <int64_t>n + a - 1) // a * a
        if posix_memalign(&bounce, a, end - start) != 0:
            return -12
        rc = qf_pread_full(self.fd, <char *>bounce, end - start, start)
        if rc >= 0:
            memcpy(<char *>bounce + (off - start), buf, n)
            rc = qf_pwrite_full(self.fd, <char *>bounce, end - start, start, 0)
            self.unsynced = True
            if rc >= 0:
                rc = n
        free(bounce)
        return rc

    cdef int read_at(self, char *buf, int64_t n, int64_t off) except -1:
        """c_pread with the GIL released around it, an error raised as OSError."""
        cdef int64_t rc
        with nogil:
            rc = self.c_pread(buf, n, off)
        if rc < 0:
            self.raise_errno(rc, "read", off)
        return 0

    cdef int write_at(self, const char *buf, int64_t n, int64_t off) except -1:
        """c_pwrite with the GIL released around it, an error raised as OSError."""
        cdef int64_t rc
        with nogil:
            rc = self.c_pwrite(buf, n, off)
        if rc < 0:
            self.raise_errno(rc, "write", off)
        return 0

    def pread(self, int64_t off, Py_ssize_t n):
        """Read ``n`` bytes at ``off`` (zeros past EOF) and return bytes."""
        cdef object out = PyBytes_FromStringAndSize(NULL, n)
        cdef char *p = PyBytes_AS_STRING(out)
        cdef int64_t rc
        with nogil:
            rc = self.c_pread(p, n, off)
        if rc < 0:
            self.raise_errno(rc, "read", off)
        return out

    def preadinto(self, buf, int64_t off):
        cdef Py_buffer view
        cdef int64_t rc
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            with nogil:
                rc = self.c_pread(<char *>view.buf, view.len, off)
        finally:
            PyBuffer_Release(&view)
        if rc < 0:
            self.raise_errno(rc, "read", off)
        return rc

    def pwrite(self, data, int64_t off):
        cdef Py_buffer view
        cdef int64_t rc
        if not self.writable:
            raise PermissionError(f"{self.path}: file is open read-only")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            with nogil:
                rc = self.c_pwrite(<const char *>view.buf, view.len, off)
        finally:
            PyBuffer_Release(&view)
        if rc < 0:
            self.raise_errno(rc, "write", off)
        return rc

    def sync(self):
        """Make every completed write stable (fdatasync; none when no write
        completed since the last one started)."""
        cdef int rc
        if not self.unsynced:
            return
        self.unsynced = False           # (before: a write completing meanwhile sets it again)
        with nogil:
            rc = fdatasync(self.fd)
        if rc != 0:
            self.unsynced = True
            self.raise_errno(-errno, "fdatasync", 0)

    def sync_all(self):
        """fsync: data and the file's size and metadata."""
        cdef int rc
        self.unsynced = False
        with nogil:
            rc = fsync(self.fd)
        if rc != 0:
            self.unsynced = True
            self.raise_errno(-errno, "fsync", 0)

    def start_writeback(self):
        """Start writing the file's dirty pages to the device without
        waiting for them (sync_file_range WRITE): a later barrier then has
        less left to wait for.  Orders nothing and promises nothing; a
        hint, so failures are ignored."""
        with nogil:
            sync_file_range(self.fd, 0, 0, SYNC_FILE_RANGE_WRITE)

    def size(self):
        """Bytes in the file (lseek: block devices too)."""
        return os.lseek(self.fd, 0, os.SEEK_END)

    @property
    def is_device(self):
        from ..host.file import is_device
        return is_device(self.fd)

    def truncate(self, int64_t size):
        """Set the file's size (a block device must already be this large)."""
        from ..host.file import set_size
        try:
            set_size(self.fd, size, self.path)
        finally:
            self.unsynced = True

    def punch_hole(self, int64_t off, int64_t length):
        try:
            return punch_hole(self.fd, off, length)
        finally:
            self.unsynced = True

    def zero_range(self, int64_t off, int64_t length):
        try:
            return zero_range(self.fd, off, length)
        finally:
            self.unsynced = True

    def fallocate(self, int64_t off, int64_t length):
        try:
            os.posix_fallocate(self.fd, off, length)
        finally:
            self.unsynced = True


def punch_hole(int fd, int64_t off, int64_t length):
    """Deallocate a host range of ``fd`` (reads then return zeros; on a
    block device, a discard that zeroes).  Returns False when the file
    system or device cannot do it; the range is then left as is."""
    cdef int rc
    with nogil:
        rc = qf_punch_hole(fd, off, length)
    return rc == 0


def zero_range(int fd, int64_t off, int64_t length):
    """Make a host range of ``fd`` read as zeros without writing data, if
    the file system or device can (returns whether it did)."""
    cdef int rc
    with nogil:
        rc = qf_zero_range(fd, off, length)
    return rc == 0


def pwrite_buffers(int fd, bufs, int64_t off):
    """Write the buffers of ``bufs`` back to back at ``off`` in buffered
    calls of at most QF_WRITE_MAX bytes, the GIL released once for all.
    Returns (0, end) when all were written, else (errno, the offset of
    the write that failed)."""
    cdef Py_ssize_t n = len(bufs), i, held = 0
    cdef Py_buffer *views = <Py_buffer *>calloc(max(n, 1), sizeof(Py_buffer))
    cdef int64_t rc = 0
    if views == NULL:
        raise MemoryError()
    try:
        while held < n:
            PyObject_GetBuffer(bufs[held], &views[held], PyBUF_SIMPLE)
            held += 1
        with nogil:
            for i in range(n):
                rc = qf_pwrite_full(fd, <const char *>views[i].buf, views[i].len, off,
                                    QF_WRITE_MAX)
                if rc < 0:
                    break
                off += views[i].len
    finally:
        for i in range(held):
            PyBuffer_Release(&views[i])
        free(views)
    return (<int>-rc if rc < 0 else 0), off
