"""nettle's block ciphers, bound with cffi in ABI mode, for the LUKS ciphers
OpenSSL's libcrypto lacks: Serpent, Twofish, CAST5 (only in OpenSSL's
legacy provider) and AES-192 in XTS mode.  qemu 7.2 (Debian) takes these
from the same library (libnettle.so.8), so what it writes we read.

As engine/libcrypto.py: no headers, no build step.  Python only makes
the key schedules (cffi buffers, read only once made, so threads share
them); the sector loop and the cipher mode run in C
(``_ext/sectorcipher.BlockSectorCipher``, csrc/qf_blockmodes.h), which is
given the addresses of nettle's encrypt/decrypt functions.
"""

from ..errors import UnsupportedFeatureError
from .cffi_lib import CffiLibrary

_CDEF = """
void nettle_serpent_set_key(void *ctx, size_t length, const uint8_t *key);
void nettle_serpent_encrypt(const void *ctx, size_t length, uint8_t *dst, const uint8_t *src);
void nettle_serpent_decrypt(const void *ctx, size_t length, uint8_t *dst, const uint8_t *src);
void nettle_twofish_set_key(void *ctx, size_t length, const uint8_t *key);
void nettle_twofish_encrypt(const void *ctx, size_t length, uint8_t *dst, const uint8_t *src);
void nettle_twofish_decrypt(const void *ctx, size_t length, uint8_t *dst, const uint8_t *src);
void nettle_cast5_set_key(void *ctx, size_t length, const uint8_t *key);
void nettle_cast128_encrypt(const void *ctx, size_t length, uint8_t *dst, const uint8_t *src);
void nettle_cast128_decrypt(const void *ctx, size_t length, uint8_t *dst, const uint8_t *src);
void nettle_aes128_set_encrypt_key(void *ctx, const uint8_t *key);
void nettle_aes128_set_decrypt_key(void *ctx, const uint8_t *key);
void nettle_aes128_encrypt(const void *ctx, size_t length, uint8_t *dst, const uint8_t *src);
void nettle_aes128_decrypt(const void *ctx, size_t length, uint8_t *dst, const uint8_t *src);
void nettle_aes192_set_encrypt_key(void *ctx, const uint8_t *key);
void nettle_aes192_set_decrypt_key(void *ctx, const uint8_t *key);
void nettle_aes192_encrypt(const void *ctx, size_t length, uint8_t *dst, const uint8_t *src);
void nettle_aes192_decrypt(const void *ctx, size_t length, uint8_t *dst, const uint8_t *src);
void nettle_aes256_set_encrypt_key(void *ctx, const uint8_t *key);
void nettle_aes256_set_decrypt_key(void *ctx, const uint8_t *key);
void nettle_aes256_encrypt(const void *ctx, size_t length, uint8_t *dst, const uint8_t *src);
void nettle_aes256_decrypt(const void *ctx, size_t length, uint8_t *dst, const uint8_t *src);
"""

# Bytes reserved for any key schedule: nettle 3's largest used here is
# struct twofish_ctx (40 + 4 * 256 32-bit words, 4256 bytes).
SCHEDULE_BYTES = 4352

# family -> (block bytes, nettle name stem, encrypt and decrypt function
# names); AES has a key schedule per direction and per key size.
FAMILIES = {
    "serpent": (16, "serpent", "nettle_serpent_encrypt", "nettle_serpent_decrypt"),
    "twofish": (16, "twofish", "nettle_twofish_encrypt", "nettle_twofish_decrypt"),
    "cast5": (8, "cast5", "nettle_cast128_encrypt", "nettle_cast128_decrypt"),
    "aes": (16, "aes", None, None),
}

_load = CffiLibrary(_CDEF, "nettle", "libnettle.so.8", "this cipher (the nettle library)",
                    "encrypt.cipher-alg").load


def available():
    """Whether nettle can be loaded."""
    try:
        _load()
    except UnsupportedFeatureError:
        return False
    return True


def block_size(family):
    return FAMILIES[family][0]


def _address(name):
    ffi, lib = _load()
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))


class KeySchedule:
    """One keyed block cipher of ``family`` (key: bytes): the addresses of
    its encrypt and decrypt functions and of their key schedules, kept
    alive by this object (never shown)."""

    __slots__ = ("encrypt", "decrypt", "key_enc", "key_dec", "_buffers")

    def __init__(self, family, key):
        ffi, lib = _load()
        _, stem, enc_name, dec_name = FAMILIES[family]
        if family == "aes":
            bits = len(key) * 8
            if bits not in (128, 192, 256):
                raise UnsupportedFeatureError(f"AES takes a 16, 24 or 32-byte key, not "
                                              f"{len(key)}", feature="encrypt.cipher-alg")
            enc, dec = ffi.new(f"char[{SCHEDULE_BYTES}]"), ffi.new(f"char[{SCHEDULE_BYTES}]")
            getattr(lib, f"nettle_aes{bits}_set_encrypt_key")(enc, key)
            getattr(lib, f"nettle_aes{bits}_set_decrypt_key")(dec, key)
            enc_name, dec_name = f"nettle_aes{bits}_encrypt", f"nettle_aes{bits}_decrypt"
        else:
            enc = dec = ffi.new(f"char[{SCHEDULE_BYTES}]")
            getattr(lib, f"nettle_{stem}_set_key")(enc, len(key), key)
        self._buffers = (enc, dec)
        self.encrypt, self.decrypt = _address(enc_name), _address(dec_name)
        self.key_enc = int(ffi.cast("uintptr_t", enc))
        self.key_dec = int(ffi.cast("uintptr_t", dec))

    def __repr__(self):
        return "<KeySchedule>"
