from libc.stdint cimport int64_t

# The descriptor of a File that has none (_ext/hookfile.pyx: bytes from
# Python): never a valid one, so the C paths that use ``fd`` directly
# (batch.pyx) leave such a file to c_pread.
cdef enum:
    NO_FD = 0x7fffffff

cdef extern from "qf_readfd.h" nogil:
    int qf_read_fd(int *slots, int fd, int oflags)

cdef class File:
    cdef readonly int fd
    cdef readonly object path
    cdef readonly bint writable
    cdef readonly bint direct
    cdef readonly int align
    cdef int flags                       # open flags, for resume()
    cdef readonly bint suspended         # descriptor given back (suspend); resume() reopens
    cdef int read_fds[8]                 # QF_READ_FDS: the batch engine's per-thread read
                                         # descriptors (csrc/qf_readfd.h; read_fd)
    # A write-like call completed since the last fdatasync started (set after
    # each one completes, cleared before each fdatasync): sync() skips the
    # fdatasync when clear, as qemu skips a flush with no write since the
    # last (write_gen == flushed_gen).  Writes that bypass c_pwrite (batch.pyx,
    # ImageState.write_data_pieces) set it themselves.
    cdef public bint unsynced

    cdef bint aligned(self, const void *buf, size_t n, int64_t off) noexcept nogil
    cdef inline int read_fd(self) noexcept nogil:
        """The descriptor this thread's batched reads use (see qf_readfd.h)."""
        return qf_read_fd(self.read_fds, self.fd, self.flags)
    cdef int64_t c_pread(self, char *buf, size_t n, int64_t off) noexcept nogil
    cdef int64_t c_pwrite(self, const char *buf, size_t n, int64_t off) noexcept nogil
    cdef raise_errno(self, int64_t rc, str what, int64_t off)
    cdef int read_at(self, char *buf, int64_t n, int64_t off) except -1
    cdef int write_at(self, const char *buf, int64_t n, int64_t off) except -1
