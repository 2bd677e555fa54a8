# cython: language_level=3
"""Sector ciphers (qemu's crypto/block.c helpers, crypto/ivgen-*.c): whole
512-byte sectors en/decrypted in place in one batch with the GIL released,
one libcrypto context reused for the batch and the IV (XTS: the tweak)
set per sector from the sector number:

- plain:   the sector number's low 32 bits, little-endian, zero-padded;
- plain64: the sector number, 64 bits little-endian, zero-padded;
- essiv:   plain64 encrypted with AES-ECB under hash(master key);
- none:    ECB (no IV).

libcrypto is reached through the addresses engine/libcrypto.py (cffi, ABI
mode) hands over; contexts are made there, keyed for one direction, and
kept in a pool so that threads never share one.  ``SectorTransform`` is the
data-transform hook (hooks.pxd) built on a cipher: the sector number is the
host offset / 512 (qemu's LUKS in qcow2, crypt_physical_offset), or the
guest offset / 512 (legacy AES-CBC).
"""

from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.string cimport memset

from .hooks cimport DataTransform

from ..errors import InvalidArgumentError, Qcow2Error

ctypedef int (*init_fn)(void *ctx, const void *cipher, void *impl, const unsigned char *key,
                        const unsigned char *iv, int enc) noexcept nogil
ctypedef int (*update_fn)(void *ctx, unsigned char *out, int *outl, const unsigned char *inp,
                          int inl) noexcept nogil
ctypedef void (*free_fn)(void *ctx) noexcept nogil

cdef enum:
    SECTOR = 512
    C_IV_NONE = 0
    C_IV_PLAIN = 1
    C_IV_PLAIN64 = 2
    C_IV_ESSIV = 3

IV_NONE, IV_PLAIN, IV_PLAIN64, IV_ESSIV = C_IV_NONE, C_IV_PLAIN, C_IV_PLAIN64, C_IV_ESSIV


cdef inline void put_le64(unsigned char *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <unsigned char>(v >> (8 * i))


cdef class SectorCipher:
    """``evp_name`` (an EVP cipher name, e.g. "aes-256-xts") keyed with
    ``key``; ``ivgen`` one of IV_*; ESSIV takes ``essiv_name`` and
    ``essiv_key``.  ``contexts(encrypt)`` makes one keyed context (the
    caller's libcrypto binding); ``entry_points`` are the addresses of
    EVP_CipherInit_ex, EVP_CipherUpdate and EVP_CIPHER_CTX_free."""

    cdef init_fn c_init
    cdef update_fn c_update
    cdef free_fn c_free
    cdef readonly int ivgen
    cdef object _make                   # encrypt -> (ctx, essiv ctx or 0)
    cdef list _pool_enc, _pool_dec
    cdef list _all

    def __cinit__(self, entry_points, make_contexts, int ivgen):
        if ivgen not in (IV_NONE, IV_PLAIN, IV_PLAIN64, IV_ESSIV):
            raise InvalidArgumentError(f"unknown IV generator {ivgen}")
        self.c_init = <init_fn><uintptr_t>entry_points[0]
        self.c_update = <update_fn><uintptr_t>entry_points[1]
        self.c_free = <free_fn><uintptr_t>entry_points[2]
        self.ivgen = ivgen
        self._make = make_contexts
        self._pool_enc, self._pool_dec, self._all = [], [], []

    def __repr__(self):
        return f"<SectorCipher ivgen={self.ivgen}>"     # (never the key)

    cdef tuple _take(self, bint enc):
        pool = self._pool_enc if enc else self._pool_dec
        try:
            return pool.pop()
        except IndexError:
            entry = tuple(self._make(enc))
            self._all.append(entry)
            return entry

    cdef int crypt(self, unsigned char *buf, int64_t n, uint64_t sector, bint enc) except -1:
        """En/decrypt the ``n`` bytes (whole sectors) at ``buf`` in place,
        the first being sector number ``sector``."""
        cdef int rc
        cdef void *ctx
        cdef void *ectx
        if n % SECTOR:
            raise InvalidArgumentError(f"{n} bytes is not a whole number of sectors")
        if n <= 0:
            return 0
        entry = self._take(enc)
        ctx = <void *><uintptr_t>entry[0]
        ectx = <void *><uintptr_t>entry[1]
        with nogil:
            rc = self._run(ctx, ectx, buf, n // SECTOR, sector, enc)
        (self._pool_enc if enc else self._pool_dec).append(entry)
        if rc < 0:
            raise Qcow2Error(f"libcrypto failed to {'encrypt' if enc else 'decrypt'} sector "
                             f"{sector - rc - 1}")
        return 0

    cdef int _run(self, void *ctx, void *ectx, unsigned char *p, int64_t nsec, uint64_t sector,
                  bint enc) noexcept nogil:
        """0, or -(i+1) if sector i failed."""
        cdef unsigned char iv[16]
        cdef unsigned char blk[16]
        cdef int outl
        cdef int64_t i
        cdef uint64_t s
        for i in range(nsec):
            s = sector + <uint64_t>i
            if self.ivgen != C_IV_NONE:
                memset(iv, 0, 16)
                if self.ivgen == C_IV_PLAIN:
                    put_le64(iv, s & 0xFFFFFFFFu)
                elif self.ivgen == C_IV_PLAIN64:
                    put_le64(iv, s)
                else:
                    memset(blk, 0, 16)
                    put_le64(blk, s)
                    if self.c_update(ectx, iv, &outl, blk, 16) != 1 or outl != 16:
                        return -(i + 1)
                if self.c_init(ctx, NULL, NULL, NULL, iv, enc) != 1:
                    return -(i + 1)
            if self.c_update(ctx, p, &outl, p, SECTOR) != 1 or outl != SECTOR:
                return -(i + 1)
            p += SECTOR
        return 0

    def encrypt(self, unsigned char[::1] buf, uint64_t sector):
        """Encrypt ``buf`` (whole sectors) in place from sector ``sector``."""
        if buf.shape[0]:
            self.crypt(&buf[0], buf.shape[0], sector, True)

    def decrypt(self, unsigned char[::1] buf, uint64_t sector):
        """Decrypt ``buf`` (whole sectors) in place from sector ``sector``."""
        if buf.shape[0]:
            self.crypt(&buf[0], buf.shape[0], sector, False)

    def close(self):
        """Free the contexts (the cipher makes new ones if used again)."""
        cdef uintptr_t a
        all_, self._all, self._pool_enc, self._pool_dec = self._all, [], [], []
        for entry in all_:
            for a in entry:
                if a:
                    self.c_free(<void *>a)

    def __dealloc__(self):
        cdef uintptr_t a
        if self._all:
            for entry in self._all:
                for a in entry:
                    if a:
                        self.c_free(<void *>a)


cdef class SectorTransform(DataTransform):
    """The data transform of an encrypted image: each 512-byte block is
    en/decrypted by ``cipher`` as sector number host offset / 512 (LUKS in
    qcow2: qemu's crypt_physical_offset), or guest offset / 512 with
    ``by_guest`` (legacy AES-CBC)."""

    cdef readonly SectorCipher cipher
    cdef readonly bint by_guest

    def __init__(self, int64_t block_size, SectorCipher cipher, bint by_guest=False):
        if block_size != SECTOR:
            raise InvalidArgumentError("encryption works on 512-byte sectors")
        self.cipher = cipher
        self.by_guest = by_guest

    cpdef int decode(self, unsigned char[::1] buf, uint64_t host, uint64_t guest) except -1:
        if buf.shape[0]:
            self.cipher.crypt(&buf[0], buf.shape[0],
                              (guest if self.by_guest else host) // SECTOR, False)
        return 0

    cpdef int encode(self, unsigned char[::1] buf, uint64_t host, uint64_t guest) except -1:
        if buf.shape[0]:
            self.cipher.crypt(&buf[0], buf.shape[0],
                              (guest if self.by_guest else host) // SECTOR, True)
        return 0
