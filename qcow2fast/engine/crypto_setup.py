"""Encrypting a new image (qemu's qcow2_set_up_encryption, called by
create before the image gets its size) and the ``encrypt`` options.

Python spelling of qemu-img's ``-o encrypt.*`` options: a dict whose keys
are the option names without ``encrypt.`` (dashes or underscores):
``{"format": "luks", "key_secret": b"...", "cipher_alg": "aes-256",
"cipher_mode": "xts", "ivgen_alg": "plain64", "ivgen_hash_alg": None,
"hash_alg": "sha256", "iter_time": 2000}``; legacy AES-CBC takes only
``{"format": "aes", "key_secret": b"..."}`` (engine/crypto.py).
"""

from .._ext.sectorcipher import SectorTransform
from ..errors import InvalidArgumentError
from ..spec import header as hdr
from ..spec import luks as L
from . import crypto, luks
from .secret import Secret

CHOICE = ("cipher_alg", "cipher_mode", "ivgen_alg", "ivgen_hash_alg", "hash_alg")
LUKS_KEYS = ("format", "key_secret", "cipher_alg", "cipher_mode", "ivgen_alg",
             "ivgen_hash_alg", "hash_alg", "iter_time")
AES_KEYS = ("format", "key_secret")


def encrypt_options(encrypt):
    """Validated ``encrypt`` options (see the module doc), or None."""
    if encrypt is None:
        return None
    if not isinstance(encrypt, dict):
        raise InvalidArgumentError("encrypt must be a dict of encrypt.* options")
    opts = {}
    for k, v in encrypt.items():
        key = k.replace("-", "_")
        if key not in LUKS_KEYS:
            raise InvalidArgumentError(f"Invalid parameter 'encrypt.{k}'")
        opts[key] = v
    fmt = opts.get("format")
    if fmt not in ("luks", "aes"):     # (qemu names the key inside encrypt.)
        raise InvalidArgumentError(f"Parameter 'format' does not accept value '{fmt}'"
                                   if fmt is not None else
                                   "Parameter 'encrypt.format' is missing")
    if fmt == "aes":            # qemu's message for a LUKS option given with aes
        for key in opts:
            if key not in AES_KEYS:
                raise InvalidArgumentError(f"Parameter 'encrypt.{key.replace('_', '-')}' "
                                           "is unexpected")
    else:                       # the choices before the secret, as qemu's QAPI parse
        it = opts.get("iter_time", L.DEFAULT_ITER_TIME_MS)
        try:
            it = int(it)
        except (TypeError, ValueError):
            raise InvalidArgumentError("Parameter 'encrypt.iter-time' expects a number") from None
        if it <= 0:
            raise InvalidArgumentError("Parameter 'encrypt.iter-time' must be positive")
        opts["iter_time"] = it
        luks.validate_choice(**{k: opts[k] for k in CHOICE if k in opts})   # before any write
    if opts.get("key_secret") is None:
        raise crypto.MissingSecretError(crypto.NEED_SECRET)
    opts["key_secret"] = Secret(opts["key_secret"])
    if fmt == "aes":
        crypto.legacy_aes_key(opts["key_secret"])       # (a bad secret: before any write)
    return opts


def set_up(img, opts):
    """Make the open, empty image ``img`` a LUKS-encrypted one: a LUKS area
    in new clusters (zeroed, header and slot 0 written), refcounts flushed,
    barrier, then the qcow2 header names it; the transform is installed so
    that everything written after (preallocation too) is encrypted.
    Legacy AES has no area: the header's crypt_method only."""
    s = img.state
    if opts["format"] == "aes":
        s.header.crypt_method = L.CRYPT_AES
        s.file.pwrite(s.header.pack(), 0)
        s.barrier()
        enc = crypto.Encryption(L.CRYPT_AES)
        enc.cipher, transform = crypto.legacy_aes_transform(opts["key_secret"])
        s.set_transform(transform)
        img.encryption = enc
        return
    h, key = luks.new_header(opts.get("cipher_alg", "aes-256"), opts.get("cipher_mode", "xts"),
                             opts.get("ivgen_alg", "plain64"), opts.get("ivgen_hash_alg"),
                             opts.get("hash_alg", "sha256"), opts["iter_time"])
    length = h.payload_offset * L.SECTOR_SIZE
    n = -(-length // s.cluster_size)
    off = img.refcounts.alloc(n)
    s.file.pwrite(bytes(n * s.cluster_size), off)      # predictable content, as qemu
    s.allocated(off + n * s.cluster_size)
    s.metadata.add(off >> s.cluster_bits, n)
    enc = crypto.Encryption(L.CRYPT_LUKS, (off, length), h)
    luks.store_key(h, 0, opts["key_secret"], key, opts["iter_time"], enc.writer(s.file),
                   s.barrier)
    img.flush()             # the area's refcounts, barrier: stable before the header names it
    s.header.crypt_method = L.CRYPT_LUKS
    s.header.other_extensions.append(hdr.HeaderExtension(hdr.EXT_CRYPTO,
                                                         L.CRYPTO_EXT.pack(off, length)))
    s.file.pwrite(s.header.pack(), 0)
    s.barrier()
    enc.cipher = luks.make_cipher(h.cipher_alg, h.mode, h.ivgen_alg, h.ivgen_hash_alg, key)
    s.set_transform(SectorTransform(L.SECTOR_SIZE, enc.cipher))
    img.encryption = enc


def target_secret(options):
    """The passphrase in create() ``options``' ``encrypt`` dict, or None."""
    enc = (options or {}).get("encrypt") or {}
    return enc.get("key_secret", enc.get("key-secret"))
