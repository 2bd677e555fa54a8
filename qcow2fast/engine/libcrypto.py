"""OpenSSL's libcrypto EVP cipher API, bound with cffi in ABI mode.

ABI mode (``ffi.dlopen``) needs neither OpenSSL's headers nor a compiler
at build time: the few declarations below are all the binding there is,
and the shared library is the one every Debian system has (libssl3).
Python calls only the set-up functions (a context per key and direction);
the per-sector loop runs in C (``_ext/sectorcipher.pyx``), which is given
the addresses of ``EVP_CipherInit_ex`` and ``EVP_CipherUpdate`` and calls
them with the GIL released -- one context reused for a whole batch, the
IV (the XTS tweak) set per sector, which the ``cryptography`` package
cannot do without a new context per sector.
"""

from ..errors import UnsupportedFeatureError
from .cffi_lib import CffiLibrary

_CDEF = """
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
const EVP_CIPHER *EVP_get_cipherbyname(const char *name);
EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, void *impl,
                      const unsigned char *key, const unsigned char *iv, int enc);
int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                     const unsigned char *in, int inl);
int EVP_CIPHER_CTX_set_padding(EVP_CIPHER_CTX *ctx, int padding);
int EVP_CIPHER_get_key_length(const EVP_CIPHER *cipher);
unsigned long ERR_get_error(void);
void ERR_error_string_n(unsigned long e, char *buf, size_t len);
"""

_load = CffiLibrary(_CDEF, "crypto", "libcrypto.so.3", "encryption (OpenSSL's libcrypto)",
                    "encryption").load


def _error(what):
    ffi, lib = _load()
    code = lib.ERR_get_error()
    buf = ffi.new("char[256]")
    lib.ERR_error_string_n(code, buf, 256)
    return f"{what}: {ffi.string(buf).decode(errors='replace')}"


def entry_points():
    """The addresses of EVP_CipherInit_ex, EVP_CipherUpdate and
    EVP_CIPHER_CTX_free, for the C loop."""
    ffi, lib = _load()
    return tuple(int(ffi.cast("uintptr_t", ffi.addressof(lib, n)))
                 for n in ("EVP_CipherInit_ex", "EVP_CipherUpdate", "EVP_CIPHER_CTX_free"))


def has_cipher(name):
    """Whether libcrypto offers the EVP cipher ``name`` (e.g. "aes-256-xts")."""
    ffi, lib = _load()
    return lib.EVP_get_cipherbyname(name.encode()) != ffi.NULL


def new_context(name, key, encrypt):
    """A cipher context for EVP cipher ``name`` keyed with ``key`` in one
    direction (no padding): its address, to give to free_context."""
    ffi, lib = _load()
    cipher = lib.EVP_get_cipherbyname(name.encode())
    if cipher == ffi.NULL:
        raise UnsupportedFeatureError(f"cipher {name} is not available in libcrypto",
                                      feature="encrypt.cipher-alg")
    if lib.EVP_CIPHER_get_key_length(cipher) != len(key):
        raise UnsupportedFeatureError(f"cipher {name} takes a "
                                      f"{lib.EVP_CIPHER_get_key_length(cipher)}-byte key, "
                                      f"not {len(key)}", feature="encrypt.cipher-alg")
    ctx = lib.EVP_CIPHER_CTX_new()
    if ctx == ffi.NULL:
        raise MemoryError("EVP_CIPHER_CTX_new")
    if lib.EVP_CipherInit_ex(ctx, cipher, ffi.NULL, key, ffi.NULL, 1 if encrypt else 0) != 1:
        lib.EVP_CIPHER_CTX_free(ctx)
        # (the message names the cipher, never the key)
        raise UnsupportedFeatureError(_error(f"cannot key cipher {name}"),
                                      feature="encrypt.cipher-alg")
    lib.EVP_CIPHER_CTX_set_padding(ctx, 0)
    return int(ffi.cast("uintptr_t", ctx))


def free_context(address):
    ffi, lib = _load()
    lib.EVP_CIPHER_CTX_free(ffi.cast("EVP_CIPHER_CTX *", address))
