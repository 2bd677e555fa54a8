# cython: language_level=3
"""Extension points of the data path that C code calls without Python.

``DataTransform`` is the data-transform hook: every byte of a data
cluster goes through ``ImageState.read_data``/``write_data``, which decode
and encode whole blocks with the image's transform when it has one
(encryption plugs in here).

``WriteObserver`` is the write-notification hook: an image tells each of
its observers (``Image.add_write_observer``) of every guest range about to
change, from the C fast path as from the Python slow paths.
``DirtyBitmap`` is the observer persistent dirty bitmaps are built on: one
bit per ``granularity`` bytes of the guest disk, set in C.
"""

import numpy as np

cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memset

from ..errors import InvalidArgumentError

cnp.import_array()


cdef class WriteObserver:
    cdef int changed(self, int64_t offset, int64_t length) except -1:
        return 0

    def notify(self, int64_t offset, int64_t length):
        """Python access to :meth:`changed` (tests, Python observers)."""
        self.changed(offset, length)


cdef class DirtyBitmap(WriteObserver):
    """Which ``granularity``-byte granules of a ``size``-byte guest disk
    were changed while the bitmap was ``enabled``."""

    def __cinit__(self, int64_t size, int64_t granularity=65536):
        if granularity < 512 or granularity & (granularity - 1) or granularity > (1 << 31):
            raise InvalidArgumentError(f"bitmap granularity must be a power of two between "
                                       f"512 B and 2 GiB, not {granularity}")
        if size < 0:
            raise InvalidArgumentError(f"bitmap size must not be negative ({size})")
        self.granularity = granularity
        self.gran_bits = granularity.bit_length() - 1
        self.size = size
        self.nbits = (size + granularity - 1) >> self.gran_bits
        self._bits = np.zeros(max(1, (self.nbits + 7) >> 3), dtype=np.uint8)
        self.bits = <uint8_t *>cnp.PyArray_DATA(self._bits)
        self.enabled = True

    cdef int changed(self, int64_t offset, int64_t length) except -1:
        cdef int64_t g, last
        if not self.enabled or length <= 0:
            return 0
        g = offset >> self.gran_bits
        last = (offset + length - 1) >> self.gran_bits
        if last >= self.nbits:
            last = self.nbits - 1
        while g <= last:
            if (g & 7) == 0 and g + 8 <= last + 1:
                self.bits[g >> 3] = 0xFF            # a whole byte of granules
                g += 8
                continue
            self.bits[g >> 3] |= <uint8_t>(1 << (g & 7))
            g += 1
        return 0

    @property
    def bits(self):
        """The packed bits (bit ``i & 7`` of byte ``i >> 3`` is granule ``i``)."""
        return self._bits

    def count(self):
        """Dirty bytes (granules times granularity, the last one clipped)."""
        n = int(np.unpackbits(self._bits, bitorder="little")[:self.nbits].sum())
        if n and self.size % self.granularity and self.is_dirty(self.size - 1):
            n -= 1
            return n * self.granularity + self.size % self.granularity
        return n * self.granularity

    def is_dirty(self, int64_t offset):
        cdef int64_t g = offset >> self.gran_bits
        return 0 <= g < self.nbits and bool(self.bits[g >> 3] & (1 << (g & 7)))

    def dirty_ranges(self):
        """[(offset, length)] of the dirty granules, merged, clipped to the disk."""
        flags = np.unpackbits(self._bits, bitorder="little")[:self.nbits].astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], flags, [0]))))
        g = self.granularity
        return [(int(a) * g, min(int(b) * g, self.size) - int(a) * g)
                for a, b in zip(edges[::2], edges[1::2])]

    def clear(self):
        # With the GIL held, as ``changed`` runs: a write told during the
        # call is either cleared or kept whole, never half lost.
        memset(self.bits, 0, <size_t>self._bits.shape[0])

    def resize(self, int64_t size):
        """Cover a ``size``-byte disk (qemu's hbitmap_truncate): the bits of
        the granules both sizes have are kept, the new ones clear.  In
        place, with the GIL held like ``changed`` (an image resizing holds
        its lock, so the observer cannot be swapped for a new one)."""
        if size < 0:
            raise InvalidArgumentError(f"bitmap size must not be negative ({size})")
        old = self._bits
        nbits = (size + self.granularity - 1) >> self.gran_bits
        new = np.zeros(max(1, (nbits + 7) >> 3), dtype=np.uint8)
        n = min(len(old), len(new))
        new[:n] = old[:n]
        self._bits, self.bits = new, <uint8_t *>cnp.PyArray_DATA(new)
        self.size, self.nbits = size, nbits
        if (nbits >> 3) < len(new):           # granules past the new end clear
            self.bits[nbits >> 3] &= <uint8_t>((1 << (nbits & 7)) - 1)

    def merge(self, const uint8_t[::1] other):
        """OR ``other`` (packed bits, laid out as :attr:`bits`) in, granules
        past the disk left clear; with the GIL held, like ``changed``."""
        cdef Py_ssize_t i, n = min(other.shape[0], self._bits.shape[0])
        for i in range(n):
            self.bits[i] |= other[i]
        if self.nbits & 7 and n * 8 >= self.nbits:
            self.bits[self.nbits >> 3] &= <uint8_t>((1 << (self.nbits & 7)) - 1)


cdef class DataTransform:
    """The identity transform; subclasses decode and encode in place."""

    def __cinit__(self, int64_t block_size=512, *args, **kwargs):
        if block_size < 16 or block_size & (block_size - 1) or block_size > 65536:
            raise InvalidArgumentError(f"transform block size must be a power of two between "
                                       f"16 B and 64 KiB, not {block_size}")
        self.block_size = block_size

    cpdef int decode(self, unsigned char[::1] buf, uint64_t host, uint64_t guest) except -1:
        """Host bytes of whole blocks -> guest bytes, in place."""
        return 0

    cpdef int encode(self, unsigned char[::1] buf, uint64_t host, uint64_t guest) except -1:
        """Guest bytes of whole blocks -> host bytes, in place."""
        return 0


cdef class ChainStep:
    """The backing-chain step (see hooks.pxd); ``chain.ChainCore`` is the
    implementation."""

    cdef int read_below(self, char *buf, int64_t pos, int64_t n, int first) except -1:
        raise NotImplementedError("ChainStep.read_below")
