from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef class WriteObserver:
    # Told of every guest range a write, write_zeroes, discard or compressed
    # write is about to change (before the data moves: a crash can only
    # over-report).  Called with the GIL held and the image's lock held
    # (shared or exclusive): it must be quick and do no I/O.
    cdef int changed(self, int64_t offset, int64_t length) except -1


cdef class DirtyBitmap(WriteObserver):
    cdef readonly int64_t granularity
    cdef readonly int64_t size           # guest bytes covered
    cdef readonly int gran_bits
    cdef public bint enabled
    cdef bytearray _bits                 # bit i = granule i dirty
    cdef object _bits_view               # its export, behind ``bits``
    cdef uint8_t *bits
    cdef int64_t nbits
    cdef bint _dirty_at(self, int64_t g) noexcept
    cdef _set_bits(self, bytearray bits)
    # pack_runs without its checks: 0 < length <= 2^32-1, offset >= 0,
    # max_runs > 0, ``d`` holding 2 * max_runs words (or NULL: count only).
    # With the GIL held, like ``changed``.
    cdef Py_ssize_t descriptors(self, int64_t offset, int64_t length, uint32_t *d,
                                Py_ssize_t max_runs) noexcept


cdef class DataTransform:
    # Transforms guest data on its way between the guest and a data cluster
    # (encryption), in whole blocks of ``block_size`` bytes, in place;
    # ``host`` and ``guest`` are the block-aligned host and guest offsets of
    # ``buf``'s first byte (a sector's IV is derived from one of them: the
    # host offset for LUKS, the guest offset for legacy AES).  A lower
    # layer's data is transformed at the guest offset it shows through at
    # (layers of a chain share guest offsets).  ImageState.read_data and
    # write_data call it, with the GIL held; a Cython subclass overrides the
    # cpdef methods without a Python call.
    cdef readonly int64_t block_size
    cpdef int decode(self, unsigned char[::1] buf, uint64_t host, uint64_t guest) except -1
    cpdef int encode(self, unsigned char[::1] buf, uint64_t host, uint64_t guest) except -1


cdef class ChainStep:
    # The backing-chain step of the read path: what the layers of a backing
    # chain show at guest [pos, pos+n), from layer ``first`` down (0: the
    # backing file of the chain's top image), into ``buf`` -- zeros past a
    # layer's end and below the last layer.  chain.ChainCore implements it
    # in C; the core calls it with its own lock held (shared or exclusive).
    cdef int read_below(self, char *buf, int64_t pos, int64_t n, int first) except -1
