# cython: language_level=3
"""Sector ciphers (qemu's crypto/block.c helpers, crypto/ivgen-*.c): whole
512-byte sectors en/decrypted in place in one batch with the GIL released,
one libcrypto context reused for the batch and the IV (XTS: the tweak)
set per sector from the sector number:

- plain:   the sector number's low 32 bits, little-endian, zero-padded;
- plain64: the sector number, 64 bits little-endian, zero-padded (cut to
           the IV's length: 8 bytes for CAST5);
- essiv:   plain64 encrypted (ECB) under hash(master key);
- none:    ECB (no IV).

``EvpSectorCipher``: libcrypto does the mode, reached through the
addresses engine/libcrypto.py (cffi, ABI mode) hands over; contexts are
made there, keyed for one direction, and kept in a pool so that threads
never share one.  ``BlockSectorCipher``: for what libcrypto lacks
(Serpent, Twofish, CAST5, AES-192-XTS), the mode is done here
(csrc/qf_blockmodes.h) over nettle's block functions, as qemu 7.2 takes
them from nettle (engine/libnettle.py binds it).  ``SectorTransform`` is the
data-transform hook (hooks.pxd) built on a cipher: the sector number is the
host offset / 512 (qemu's LUKS in qcow2, crypt_physical_offset), or the
guest offset / 512 (legacy AES-CBC).
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset

from .hooks cimport DataTransform

from ..errors import InvalidArgumentError, Qcow2Error

ctypedef int (*init_fn)(void *ctx, const void *cipher, void *impl, const unsigned char *key,
                        const unsigned char *iv, int enc) noexcept nogil
ctypedef int (*update_fn)(void *ctx, unsigned char *out, int *outl, const unsigned char *inp,
                          int inl) noexcept nogil
ctypedef void (*free_fn)(void *ctx) noexcept nogil

cdef extern from "qf_blockmodes.h" nogil:
    ctypedef void (*qf_block_fn)(const void *ctx, size_t length, uint8_t *dst,
                                 const uint8_t *src) noexcept nogil
    ctypedef struct qf_blockmode:
        qf_block_fn encrypt
        qf_block_fn decrypt
        const void *key_enc
        const void *key_dec
        qf_block_fn tweak_encrypt
        const void *key_tweak
        int block
        int mode
    enum:
        QF_MAX_BLOCK
        QF_MODE_ECB
        QF_MODE_CBC
        QF_MODE_CTR
        QF_MODE_XTS
    void qf_sector_crypt(const qf_blockmode *m, uint8_t *p, size_t n, const uint8_t *iv,
                         int enc) noexcept nogil

cdef enum:
    SECTOR = 512
    C_IV_NONE = 0
    C_IV_PLAIN = 1
    C_IV_PLAIN64 = 2
    C_IV_ESSIV = 3

IV_NONE, IV_PLAIN, IV_PLAIN64, IV_ESSIV = C_IV_NONE, C_IV_PLAIN, C_IV_PLAIN64, C_IV_ESSIV
MODE_ECB, MODE_CBC, MODE_CTR, MODE_XTS = QF_MODE_ECB, QF_MODE_CBC, QF_MODE_CTR, QF_MODE_XTS


cdef inline void put_le64(unsigned char *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <unsigned char>(v >> (8 * i))


cdef inline void sector_iv(unsigned char *iv, int niv, uint64_t s, int ivgen) noexcept nogil:
    """The IV of sector ``s`` (``niv`` bytes): plain, plain64, or ESSIV's
    input (plain64, encrypted by the caller)."""
    cdef unsigned char le[8]
    memset(iv, 0, niv)
    put_le64(le, s & 0xFFFFFFFFu if ivgen == C_IV_PLAIN else s)
    memcpy(iv, le, 8 if niv > 8 else niv)


cdef class SectorCipher:
    """Whole 512-byte sectors en/decrypted in place, the IV (XTS: the
    tweak) set per sector from the sector number: ``EvpSectorCipher``
    (libcrypto does the mode) or ``BlockSectorCipher`` (the mode done
    here over nettle's block cipher)."""

    cdef int crypt(self, unsigned char *buf, int64_t n, uint64_t sector, bint enc) except -1:
        """En/decrypt the ``n`` bytes (whole sectors) at ``buf`` in place,
        the first being sector number ``sector``."""
        raise NotImplementedError("SectorCipher.crypt")

    def encrypt(self, unsigned char[::1] buf, uint64_t sector):
        """Encrypt ``buf`` (whole sectors) in place from sector ``sector``."""
        if buf.shape[0]:
            self.crypt(&buf[0], buf.shape[0], sector, True)

    def decrypt(self, unsigned char[::1] buf, uint64_t sector):
        """Decrypt ``buf`` (whole sectors) in place from sector ``sector``."""
        if buf.shape[0]:
            self.crypt(&buf[0], buf.shape[0], sector, False)

    def close(self):
        """Give back what the cipher holds (it makes it again if used)."""


cdef class EvpSectorCipher(SectorCipher):
    """``make_contexts(encrypt)`` makes one keyed libcrypto context (and
    the ESSIV one, or 0); ``entry_points`` are the addresses of
    EVP_CipherInit_ex, EVP_CipherUpdate and EVP_CIPHER_CTX_free; ``ivgen``
    one of IV_*."""

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
        return f"<EvpSectorCipher ivgen={self.ivgen}>"     # (never the key)

    cdef tuple _take(self, bint enc):
        pool = self._pool_enc if enc else self._pool_dec
        try:
            return pool.pop()
        except IndexError:
            entry = tuple(self._make(enc))
            self._all.append(entry)
            return entry

    cdef int crypt(self, unsigned char *buf, int64_t n, uint64_t sector, bint enc) except -1:
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
        cdef int outl
        cdef int64_t i
        for i in range(nsec):
            if self.ivgen != C_IV_NONE:
                sector_iv(iv, 16, sector + <uint64_t>i, self.ivgen)
                if self.ivgen == C_IV_ESSIV:
                    if self.c_update(ectx, iv, &outl, iv, 16) != 1 or outl != 16:
                        return -(i + 1)
                if self.c_init(ctx, NULL, NULL, NULL, iv, enc) != 1:
                    return -(i + 1)
            if self.c_update(ctx, p, &outl, p, SECTOR) != 1 or outl != SECTOR:
                return -(i + 1)
            p += SECTOR
        return 0

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


cdef class BlockSectorCipher(SectorCipher):
    """A cipher mode (MODE_*) done here over a block cipher given as
    nettle's functions and key schedules (engine/libnettle.py), for what
    libcrypto lacks.  ``functions``: addresses of the data cipher's
    encrypt and decrypt, the XTS tweak cipher's encrypt and the ESSIV
    cipher's encrypt (0 where unused); ``schedules``: addresses of the
    key schedules for each (data encrypt, data decrypt, tweak, ESSIV),
    kept alive by ``keep``.  The schedules are read only: threads share
    them."""

    cdef qf_blockmode m
    cdef qf_block_fn essiv_encrypt
    cdef const void *key_essiv
    cdef readonly int ivgen
    cdef object _keep

    def __cinit__(self, functions, schedules, int block, int mode, int ivgen, keep):
        if ivgen not in (IV_NONE, IV_PLAIN, IV_PLAIN64, IV_ESSIV):
            raise InvalidArgumentError(f"unknown IV generator {ivgen}")
        if block not in (8, 16) or mode not in (MODE_ECB, MODE_CBC, MODE_CTR, MODE_XTS) \
                or (mode == MODE_XTS and block != 16):
            raise InvalidArgumentError(f"no cipher mode {mode} over {block}-byte blocks")
        self.m.encrypt = <qf_block_fn><uintptr_t>functions[0]
        self.m.decrypt = <qf_block_fn><uintptr_t>functions[1]
        self.m.tweak_encrypt = <qf_block_fn><uintptr_t>functions[2]
        self.essiv_encrypt = <qf_block_fn><uintptr_t>functions[3]
        self.m.key_enc = <const void *><uintptr_t>schedules[0]
        self.m.key_dec = <const void *><uintptr_t>schedules[1]
        self.m.key_tweak = <const void *><uintptr_t>schedules[2]
        self.key_essiv = <const void *><uintptr_t>schedules[3]
        if (mode == MODE_XTS and (self.m.tweak_encrypt == NULL or self.m.key_tweak == NULL)) \
                or (ivgen == IV_ESSIV and (self.essiv_encrypt == NULL or self.key_essiv == NULL)):
            raise InvalidArgumentError("a tweak or ESSIV cipher is missing")
        self.m.block = block
        self.m.mode = mode
        self.ivgen = IV_NONE if mode == MODE_ECB else ivgen
        self._keep = keep

    def __repr__(self):
        return f"<BlockSectorCipher mode={self.m.mode} ivgen={self.ivgen}>"   # (never the key)

    cdef int crypt(self, unsigned char *buf, int64_t n, uint64_t sector, bint enc) except -1:
        cdef unsigned char iv[QF_MAX_BLOCK]
        cdef int64_t i
        cdef int niv = self.m.block
        if n % SECTOR:
            raise InvalidArgumentError(f"{n} bytes is not a whole number of sectors")
        with nogil:
            for i in range(n // SECTOR):
                if self.ivgen != C_IV_NONE:
                    sector_iv(iv, niv, sector + <uint64_t>i, self.ivgen)
                    if self.ivgen == C_IV_ESSIV:
                        self.essiv_encrypt(self.key_essiv, niv, iv, iv)
                qf_sector_crypt(&self.m, buf, SECTOR, iv, enc)
                buf += SECTOR
        return 0


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
