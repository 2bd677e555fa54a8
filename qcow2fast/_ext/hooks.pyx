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
bit per ``granularity`` bytes of the guest disk, set in C.  Its runs of
dirty and clean granules are scanned in C too, 64 granules a word, for the
API (``runs``) and for NBD's ``qemu:dirty-bitmap:`` contexts (``pack_runs``
writes the block descriptors straight into the reply).
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from .common cimport QF_BSWAP32

from ..errors import InvalidArgumentError

cdef extern from *:
    """
    #define QF_CTZ64(x) __builtin_ctzll(x)
    """
    int QF_CTZ64(uint64_t) nogil

# A run's length in a block descriptor is 32 bits (NBD).
cdef int64_t MAX_DESCRIPTOR_LENGTH = 0xFFFFFFFF


cdef inline uint64_t _word(const uint8_t *bits, int64_t nbytes, int64_t w) noexcept nogil:
    """Granules 64w..64w+63 (bit j: granule 64w+j); bytes past the array read
    as clean.  Little-endian hosts, as the rest of the kernels."""
    cdef uint64_t v = 0
    cdef int64_t at = w << 3
    if at + 8 <= nbytes:
        memcpy(&v, bits + at, 8)
    elif at < nbytes:
        memcpy(&v, bits + at, <size_t>(nbytes - at))
    return v


cdef inline int64_t _run_end(const uint8_t *bits, int64_t nbytes, int64_t g, int64_t stop,
                             bint dirty) noexcept nogil:
    """The first granule in [g, stop) that is not ``dirty``, or ``stop``.
    Whole blocks of 8 words without an edge are skipped with one test."""
    cdef uint64_t flip = (<uint64_t>0) - <uint64_t>dirty      # all ones: look for a clean bit
    cdef uint64_t blk[8]
    cdef int64_t w = g >> 6, full = nbytes >> 3               # words wholly in the array
    cdef uint64_t x = (_word(bits, nbytes, w) ^ flip) & (~(<uint64_t>0) << (g & 63))
    while not x:
        w += 1
        if (w << 6) >= stop:
            return stop
        if w + 8 <= full:
            memcpy(blk, bits + (w << 3), 64)
            if not ((blk[0] ^ flip) | (blk[1] ^ flip) | (blk[2] ^ flip) | (blk[3] ^ flip)
                    | (blk[4] ^ flip) | (blk[5] ^ flip) | (blk[6] ^ flip) | (blk[7] ^ flip)):
                w += 7
                continue
        x = _word(bits, nbytes, w) ^ flip
    g = (w << 6) + QF_CTZ64(x)
    return g if g < stop else stop


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
        self._set_bits(bytearray(max(1, (self.nbits + 7) >> 3)))
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

    cdef _set_bits(self, bytearray bits):
        """Install ``bits``; the bytearray stays exported (never resized)
        while ``self.bits`` points into it."""
        cdef uint8_t[::1] view = bits
        self._bits, self._bits_view, self.bits = bits, view, &view[0]

    @property
    def bits(self):
        """The packed bits, a ``bytearray`` (bit ``i & 7`` of byte ``i >> 3``
        is granule ``i``; the bits past the disk's end are clear)."""
        return self._bits

    def count(self):
        """Dirty bytes (granules times granularity, the last one clipped)."""
        n = int.from_bytes(self._bits, "little").bit_count()
        if n and self.size % self.granularity and self.is_dirty(self.size - 1):
            n -= 1
            return n * self.granularity + self.size % self.granularity
        return n * self.granularity

    def is_dirty(self, int64_t offset):
        cdef int64_t g = offset >> self.gran_bits
        return 0 <= g < self.nbits and bool(self.bits[g >> 3] & (1 << (g & 7)))

    def dirty_ranges(self):
        """[(offset, length)] of the dirty granules, merged, clipped to the disk."""
        return [(at, n) for at, n, dirty in self.runs(0, self.size) if dirty]

    cdef bint _dirty_at(self, int64_t g) noexcept:
        return g < self.nbits and (self.bits[g >> 3] >> (g & 7)) & 1

    def runs(self, int64_t offset, int64_t length):
        """[(offset, length, dirty)] alternating over guest [offset,
        offset+length); past the bitmap's size, clean.  With the GIL held,
        like ``changed``: a snapshot of the bits."""
        cdef int64_t end = offset + length, g, stop, nxt, at, to
        cdef int64_t nbytes = len(self._bits)
        cdef bint dirty
        if offset < 0 or length < 0:
            raise InvalidArgumentError(f"range [{offset}, {end}) is not valid")
        out = []
        if not length:
            return out
        g = offset >> self.gran_bits
        stop = ((end - 1) >> self.gran_bits) + 1
        at = offset
        dirty = self._dirty_at(g)
        while at < end:
            nxt = _run_end(self.bits, nbytes, g, stop, dirty)
            to = nxt << self.gran_bits if nxt < stop else end
            out.append((at, to - at, bool(dirty)))
            at, g, dirty = to, nxt, not dirty
        return out

    def pack_runs(self, int64_t offset, int64_t length, unsigned char[::1] out,
                  Py_ssize_t max_runs):
        """Write the first (at most ``max_runs``) alternating runs of guest
        [offset, offset+length) into ``out`` as NBD block descriptors: a
        big-endian 32-bit length, then 32-bit flags (1 dirty, 0 clean).
        Returns how many; they may describe less than the whole range.
        ``out`` must hold 8 * ``max_runs`` bytes; with ``out`` None, only
        counts them."""
        cdef uint32_t *d = NULL
        if offset < 0 or length <= 0 or length > MAX_DESCRIPTOR_LENGTH or max_runs <= 0:
            raise InvalidArgumentError(f"cannot describe [{offset}, +{length}) in "
                                       f"{max_runs} block descriptors")
        if out is not None:
            if out.shape[0] < 8 * max_runs:
                raise InvalidArgumentError(f"{out.shape[0]} bytes do not hold {max_runs} "
                                           "block descriptors")
            d = <uint32_t *>&out[0]
        return self.descriptors(offset, length, d, max_runs)

    cdef Py_ssize_t descriptors(self, int64_t offset, int64_t length, uint32_t *d,
                                Py_ssize_t max_runs) noexcept:
        cdef int64_t end = offset + length, g, stop, nxt, at, to
        cdef int64_t nbytes = len(self._bits)
        cdef Py_ssize_t n = 0
        cdef bint dirty
        g = offset >> self.gran_bits
        stop = ((end - 1) >> self.gran_bits) + 1
        at = offset
        dirty = self._dirty_at(g)
        while at < end and n < max_runs:
            nxt = _run_end(self.bits, nbytes, g, stop, dirty)
            to = nxt << self.gran_bits if nxt < stop else end
            if d != NULL:
                d[2 * n] = QF_BSWAP32(<uint32_t>(to - at))
                d[2 * n + 1] = QF_BSWAP32(<uint32_t>dirty)
            n += 1
            at, g, dirty = to, nxt, not dirty
        return n

    def clear(self):
        # With the GIL held, as ``changed`` runs: a write told during the
        # call is either cleared or kept whole, never half lost.
        memset(self.bits, 0, <size_t>len(self._bits))

    def resize(self, int64_t size):
        """Cover a ``size``-byte disk (qemu's hbitmap_truncate): the bits of
        the granules both sizes have are kept, the new ones clear.  In
        place, with the GIL held like ``changed`` (an image resizing holds
        its lock, so the observer cannot be swapped for a new one)."""
        if size < 0:
            raise InvalidArgumentError(f"bitmap size must not be negative ({size})")
        old = self._bits
        nbits = (size + self.granularity - 1) >> self.gran_bits
        new = bytearray(max(1, (nbits + 7) >> 3))
        n = min(len(old), len(new))
        new[:n] = old[:n]
        self._set_bits(new)
        self.size, self.nbits = size, nbits
        if (nbits >> 3) < len(new):           # granules past the new end clear
            self.bits[nbits >> 3] &= <uint8_t>((1 << (nbits & 7)) - 1)

    def merge(self, const uint8_t[::1] other):
        """OR ``other`` (packed bits, laid out as :attr:`bits`) in, granules
        past the disk left clear; with the GIL held, like ``changed``."""
        cdef Py_ssize_t i, n = min(other.shape[0], len(self._bits))
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
