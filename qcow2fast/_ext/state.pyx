# cython: language_level=3
"""``ImageState``: everything one open image is made of, in one object
(the role of qemu's ``BDRVQcow2State`` in block/qcow2.h).

The engine's subsystems (mapping, refcounts, cluster allocation,
subclusters, compressed clusters, flush ordering) are each given this
object; none of them owns a copy of what is here.  Its fields are C fields
so that the data path in ``core.pyx`` reads them without Python.
"""

cimport numpy as cnp
from libc.stdint cimport uint64_t, int64_t

cnp.import_array()

CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")
ZERO_FROM_NEVER = 1 << 62      # zero_from of a block device: no host byte is known to be zero


cdef class ImageState:
    def __cinit__(self, path, File file, header, geo, str cache_mode, bint read_only):
        self.path = path
        self.file = file
        self.data_file = file
        self.header = header
        self.geo = geo
        self.cluster_bits = geo.cluster_bits
        self.cluster_size = geo.cluster_size
        self.l2_bits = geo.l2_bits
        self.slice_bits = geo.slice_bits
        self.extended = geo.extended_l2
        self.unit_bits = geo.unit_bits
        self.size = header.size
        self.cache_mode = cache_mode
        self.read_only = read_only
        self.writethrough = cache_mode in ("writethrough", "directsync")
        self.unsafe = cache_mode == "unsafe"
        self.closed = False
        self.l1 = NULL
        self.l1_size = 0
        self.meta_bits = NULL
        self.meta_clusters = 0

    def set_size(self, int64_t size):
        """The guest disk's size; the caller writes the header field."""
        self.size = size
        self.header.size = size

    def set_l1(self, cnp.ndarray l1):
        """Install the active L1 table (native byte order, contiguous uint64).
        The caller holds the exclusive lock."""
        self._l1 = l1
        self.l1 = <uint64_t *>cnp.PyArray_DATA(l1)
        self.l1_size = l1.shape[0]

    def set_metadata_bitmap(self, cnp.ndarray bits):
        """Install the packed bitmap of host clusters holding metadata
        (``overlap.MetadataMap`` calls this when its array moves)."""
        self._meta = bits
        self.meta_bits = <const unsigned char *>cnp.PyArray_DATA(bits)
        self.meta_clusters = bits.shape[0] * 8

    cdef bint touches_metadata(self, uint64_t host, int64_t n) noexcept nogil:
        """True if host bytes [host, host+n) share a cluster with metadata."""
        cdef int64_t c = host >> self.cluster_bits
        cdef int64_t last = (host + n - 1) >> self.cluster_bits
        while c <= last and c < self.meta_clusters:
            if self.meta_bits[c >> 3] & (1 << (c & 7)):
                return True
            c += 1
        return False

    def overlaps_metadata(self, uint64_t host, int64_t n):
        """Whether host bytes [host, host+n) share a cluster with metadata
        (qemu's overlap check)."""
        return self.touches_metadata(host, n)

    def grow_host_limit(self, int64_t end):
        """L2 entries may now point below ``end`` (space was allocated)."""
        if end > self.host_limit:
            self.host_limit = end

    def allocated(self, int64_t end):
        """Book-keeping after data went into newly allocated host space that
        ends at ``end`` (fresh space up to there no longer reads as zero)."""
        if end > self.zero_from:
            self.zero_from = end
        if end > self.alloc_end:
            self.alloc_end = end

    def read_only_reason(self):
        return f"{self.path}: {self.read_only_why or 'image is open read-only'}"

    def barrier(self):
        """Make completed writes stable (skipped under cache=unsafe)."""
        if not self.unsafe:
            self.file.sync()
            if self.data_file is not self.file:
                self.data_file.sync()
