# cython: language_level=3
"""``ImageState``: everything one open image is made of, in one object
(the role of qemu's ``BDRVQcow2State`` in block/qcow2.h).

The engine's subsystems (mapping, refcounts, cluster allocation,
subclusters, compressed clusters, flush ordering) are each given this
object; none of them owns a copy of what is here.  Its fields are C fields
so that the data path in ``core.pyx`` reads them without Python.
"""

import os

from libc.stdint cimport uint64_t, int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE

from ..errors import InvalidArgumentError

CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")
ZERO_FROM_NEVER = 1 << 62      # zero_from of a block device: no host byte is known to be zero
# grow_durable's step: an eighth of the file, at least GROW_MIN, at most
# GROW_MAX (under lazy refcounts each data barrier makes the file's size
# stable a step past what is allocated, flush.py; the space is a hole until
# written, and close trims what was not used).
GROW_MIN = 32 << 20
GROW_MAX = 256 << 20


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
        self.slice_bytes = geo.slice_bytes
        self.slice_unit_bits = geo.slice_bits + (geo.cluster_bits - geo.unit_bits)
        self.extended = geo.extended_l2
        self.unit_bits = geo.unit_bits
        self.size = header.size
        self.cache_mode = cache_mode
        self.read_only = read_only
        self.writethrough = cache_mode in ("writethrough", "directsync")
        self.unsafe = cache_mode == "unsafe"
        self.closed = False
        self.transform = None
        self.debug = getattr(file, "rules", None)
        self.funnel = self.debug is not None
        self.external_data = False
        self.l1 = NULL
        self.l1_size = 0
        self.meta_bits = NULL
        self.meta_clusters = 0
        self.durable_end = 0
        self.grown_from = -1

    def set_size(self, int64_t size):
        """The guest disk's size; the caller writes the header field."""
        self.size = size
        self.header.size = size

    def set_l1(self, uint64_t[::1] l1):
        """Install the active L1 table (native byte order, contiguous uint64:
        an ``array('Q')`` or any writable buffer of them).  The caller holds
        the exclusive lock; the buffer stays exported (cannot be resized)
        until the next ``set_l1``."""
        self._l1 = l1
        self.l1 = &l1[0] if l1.shape[0] else NULL
        self.l1_size = l1.shape[0]

    def set_metadata_bitmap(self, const unsigned char[::1] bits):
        """Install the packed bitmap of host clusters holding metadata
        (``overlap.MetadataMap`` calls this when its buffer moves)."""
        self._meta = bits
        self.meta_bits = &bits[0] if bits.shape[0] else NULL
        self.meta_clusters = bits.shape[0] * 8

    cdef bint touches_metadata(self, uint64_t host, int64_t n) noexcept nogil:
        """True if host bytes [host, host+n) share a cluster with metadata
        (never in an external data file: metadata stays in the image)."""
        cdef int64_t c = host >> self.cluster_bits
        cdef int64_t last = (host + n - 1) >> self.cluster_bits
        if self.external_data:
            return False
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

    def grow_durable(self, int64_t end):
        """A barrier that also makes the file's size stable a step past
        ``end`` (see GROW_MIN): when ``end`` is past ``durable_end``, the
        file is first grown to a step past it if it is shorter (the caller
        holds the exclusive lock: the size read here is the one synced).
        Fresh space below ``durable_end`` then reads as zeros after a power
        loss whether or not data written there survived, so an L2 entry
        pointing there needs no data barrier when the guest saw zeros there
        before (core.pyx, ``_alloc_write``)."""
        cdef int64_t size = self.file.size(), target
        if end > self.durable_end:
            step = min(max(size >> 3, GROW_MIN), GROW_MAX)
            target = (end + step + self.cluster_size - 1) & ~(self.cluster_size - 1)
            if target > size:
                if self.grown_from < 0:
                    self.grown_from = size
                self.file.truncate(target)
                size = target
        self.barrier()          # barrier: the file's size before entries point into it
        self.durable_end = size

    def trim_growth(self):
        """Cut what grow_durable added and no cluster uses (at close)."""
        cdef int64_t keep
        if self.grown_from < 0:
            return
        keep = max(self.alloc_end, self.grown_from)
        if self.file.size() > keep:
            self.file.truncate(keep)
        self.durable_end = min(self.durable_end, keep)

    def set_data_file(self, File f, int64_t host_limit):
        """Guest data lives in the external data file ``f`` from now on (the
        host-offset translation: L2 entries address ``f``; metadata, the
        allocator's markers and the overlap check stay with the image
        file).  Host bytes at or past ``f``'s end read as zeros; L2 entries
        may point below ``host_limit``."""
        self.data_file = f
        self.external_data = f is not self.file
        self.zero_from = f.size() if not f.is_device else ZERO_FROM_NEVER
        self.host_limit = host_limit

    def data_written(self, int64_t end):
        """Book-keeping after guest data went into host space ending at
        ``end``: of the image file (``allocated``), or of the external data
        file (only ``zero_from`` moves: alloc_end is the image file's)."""
        if not self.external_data:
            self.allocated(end)
        elif end > self.zero_from:
            self.zero_from = end

    # -- the data funnel: every byte of every data cluster goes through here --------------

    def set_transform(self, DataTransform transform):
        """Apply ``transform`` to all guest data from now on (None: none).
        Fresh host space then no longer reads as zeros through it, so new
        clusters are always written whole."""
        self.transform = transform
        self.funnel = transform is not None or self.debug is not None
        if transform is not None:
            self.zero_from = ZERO_FROM_NEVER

    cdef bint transform_aligned(self, int64_t n, uint64_t host) noexcept nogil:
        """Whether host [host, host+n) is whole transform blocks (always,
        without a transform): an unaligned write read-modify-writes its edge
        blocks, which must not race with another writer."""
        if self.transform is None:
            return True
        return (host | <uint64_t>n) & <uint64_t>(self.transform.block_size - 1) == 0

    cdef int read_data(self, char *buf, int64_t n, uint64_t host, uint64_t guest) except -1:
        """Guest data at host [host, host+n) of the data file into ``buf``;
        ``guest`` is the guest offset of its first byte."""
        cdef int64_t bs, lo, hi
        cdef char *tmp
        if self.debug is not None:
            self.debug.event("read_aio")
        if self.transform is None or n <= 0:
            return self.data_file.read_at(buf, n, host)
        bs = self.transform.block_size
        lo = host & ~(bs - 1)
        hi = (host + n + bs - 1) & ~(bs - 1)
        if lo == <int64_t>host and hi == <int64_t>host + n:
            self.data_file.read_at(buf, n, host)
            self.transform.decode(<unsigned char[:n]> <unsigned char *> buf, host, guest)
            return 0
        tmp = <char *>malloc(hi - lo)
        if tmp == NULL:
            raise MemoryError()
        try:
            self.read_data(tmp, hi - lo, lo, guest - (host - lo))
            memcpy(buf, tmp + (host - lo), n)
        finally:
            free(tmp)
        return 0

    cdef int write_data(self, const char *buf, int64_t n, uint64_t host,
                        uint64_t guest) except -1:
        """Guest data ``buf`` (guest offset ``guest``) to host [host, host+n)
        of the data file.  With a transform, edge blocks the write covers in
        part are read, decoded and patched first (the caller holds the
        exclusive lock then)."""
        cdef int64_t bs, lo, hi
        cdef uint64_t glo
        cdef char *tmp
        if self.debug is not None:
            self.debug.event("write_aio")
        if self.transform is None or n <= 0:
            return self.data_file.write_at(buf, n, host)
        bs = self.transform.block_size
        lo = host & ~(bs - 1)
        hi = (host + n + bs - 1) & ~(bs - 1)
        glo = guest - (host - lo)
        tmp = <char *>malloc(hi - lo)
        if tmp == NULL:
            raise MemoryError()
        try:
            if lo < <int64_t>host:
                self.read_data(tmp, bs, lo, glo)
            if hi > <int64_t>host + n and (hi - bs > lo or lo == <int64_t>host):
                self.read_data(tmp + (hi - bs - lo), bs, hi - bs, glo + (hi - bs - lo))
            memcpy(tmp + (host - lo), buf, n)
            self.transform.encode(<unsigned char[:hi - lo]> <unsigned char *> tmp, lo, glo)
            self.data_file.write_at(tmp, hi - lo, lo)
        finally:
            free(tmp)
        return 0

    def read_data_into(self, buf, uint64_t host, uint64_t guest):
        """Python access to :meth:`read_data`: fill ``buf`` from ``host``
        (guest offset ``guest``)."""
        cdef Py_buffer view
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            self.read_data(<char *>view.buf, view.len, host, guest)
        finally:
            PyBuffer_Release(&view)

    def write_data_pieces(self, pieces, uint64_t host, uint64_t guest):
        """Python access to :meth:`write_data`: ``pieces`` (bytes-like) back
        to back from ``host`` (guest offset ``guest``), in one system call
        where it can."""
        cdef Py_buffer view
        cdef File f = self.data_file
        if len(pieces) > 1 and (self.funnel or f.direct):
            pieces = [b"".join(pieces)]
        if len(pieces) == 1:
            PyObject_GetBuffer(pieces[0], &view, PyBUF_SIMPLE)
            try:
                self.write_data(<const char *>view.buf, view.len, host, guest)
            finally:
                PyBuffer_Release(&view)
            return
        views = [memoryview(p).cast("B") for p in pieces]
        while views:
            try:
                n = os.pwritev(f.fd, views, host)
            finally:
                f.unsynced = True       # (after the write: see fileio.pxd)
            host += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    def debug_event(self, str name):
        """Announce qemu's blkdebug event ``name`` (host/blkdebug.py) to the
        image file's rules, if it has any."""
        if self.debug is not None:
            self.debug.event(name)

    def read_only_reason(self):
        return f"{self.path}: {self.read_only_why or 'image is open read-only'}"

    def barrier(self):
        """Make completed writes stable (skipped under cache=unsafe)."""
        if not self.unsafe:
            # The data file first: the data is stable before any metadata
            # written after this barrier can point at it.
            if self.external_data:
                self.data_file.sync()
            self.file.sync()
