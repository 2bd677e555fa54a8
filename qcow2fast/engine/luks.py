"""LUKS1 key slots (qemu's crypto/block-luks.c, crypto/afsplit.c): the
master key unlocked from a slot with a passphrase, a new header with its
master key in slot 0, a passphrase stored in or erased from a slot.

A slot holds the master key split into 4000 stripes (the anti-forensic
splitter), encrypted with a key PBKDF2 derives from the passphrase; the
master key is right when PBKDF2 of it matches the header's digest.
PBKDF2 and the hashes are hashlib's (OpenSSL, GIL released); the slot's
cipher is the image's, through _ext/sectorcipher.pyx (libcrypto for AES,
nettle for Serpent, Twofish, CAST5 and AES-192-XTS, as qemu 7.2).

The LUKS area is reached through ``read(offset, n)`` and
``write(offset, data)`` relative to its start (the qcow2 extension's
clusters).  Passphrases are :class:`Secret` objects: never shown.
"""

import hashlib
import hmac
import os
import time
import uuid as uuidlib

from .._ext.sectorcipher import (IV_ESSIV, IV_NONE, IV_PLAIN, IV_PLAIN64, MODE_CBC, MODE_CTR,
                                 MODE_ECB, MODE_XTS, BlockSectorCipher, EvpSectorCipher)
from ..errors import BadPassphraseError, InvalidArgumentError, UnsupportedFeatureError
from ..spec import luks as L
from . import libcrypto, libnettle


# -- ciphers ---------------------------------------------------------------------------

_IVGEN = {"plain": IV_PLAIN, "plain64": IV_PLAIN64, "essiv": IV_ESSIV}
_MODES = {"ecb": MODE_ECB, "cbc": MODE_CBC, "ctr": MODE_CTR, "xts": MODE_XTS}


def evp_name(cipher_alg, mode):
    """libcrypto's name for an AES cipher and mode it has (it lacks
    AES-192-XTS), else None: the rest is nettle's (engine/libnettle.py)."""
    family, kb, _ = L.CIPHER_ALGS[cipher_alg]
    name = f"aes-{kb * 8}-{mode}" if family == "aes" else None
    return name if name is not None and libcrypto.has_cipher(name) else None


def check_cipher(cipher_alg, mode):
    """Refuse a cipher and mode neither libcrypto nor nettle can do here
    (qemu's message for XTS over 8-byte blocks)."""
    if evp_name(cipher_alg, mode):
        return
    if mode == "xts" and L.CIPHER_ALGS[cipher_alg][2] != 16:
        raise UnsupportedFeatureError(f"Unsupported cipher mode {mode}",
                                      feature="encrypt.cipher-mode")
    if not libnettle.available():
        raise UnsupportedFeatureError(
            f"cipher {cipher_alg} in {mode} mode needs the nettle library, which is missing "
            "(qcow2fast encrypts through it or OpenSSL's libcrypto)",
            feature="encrypt.cipher-alg")


def make_cipher(cipher_alg, mode, ivgen_alg, ivgen_hash_alg, key):
    """A SectorCipher for qemu's (cipher, mode, ivgen, ivgen hash) keyed
    with ``key``: libcrypto's where it has the cipher (AES), else the mode
    done in C over nettle's block cipher."""
    check_cipher(cipher_alg, mode)
    ivgen = IV_NONE if mode == "ecb" else _IVGEN[ivgen_alg]
    essiv = essiv_key = None
    if ivgen == IV_ESSIV:
        essiv = L.essiv_cipher(cipher_alg, ivgen_hash_alg)
        essiv_key = hashlib.new(ivgen_hash_alg, key).digest()
    key = bytes(key)
    name = evp_name(cipher_alg, mode)
    if name is not None and (essiv is None or evp_name(essiv, "ecb")):
        return _evp_cipher(name, key, ivgen, essiv and evp_name(essiv, "ecb"), essiv_key)
    return _block_cipher(cipher_alg, mode, ivgen, key, essiv, essiv_key)


def _evp_cipher(name, key, ivgen, essiv, essiv_key):
    def contexts(encrypt):
        ctx = libcrypto.new_context(name, key, encrypt)
        try:
            ectx = libcrypto.new_context(essiv, essiv_key, True) if essiv else 0
        except BaseException:
            libcrypto.free_context(ctx)
            raise
        return ctx, ectx

    cipher = EvpSectorCipher(libcrypto.entry_points(), contexts, ivgen)
    cipher.encrypt(bytearray(L.SECTOR_SIZE), 0)     # fail now (a bad key), not at the first read
    return cipher


def _block_cipher(cipher_alg, mode, ivgen, key, essiv, essiv_key):
    family, _, block = L.CIPHER_ALGS[cipher_alg]
    if mode == "xts":           # key: data key, then tweak key
        data = libnettle.KeySchedule(family, key[:len(key) // 2])
        tweak = libnettle.KeySchedule(family, key[len(key) // 2:])
    else:
        data, tweak = libnettle.KeySchedule(family, key), None
    ess = libnettle.KeySchedule(L.CIPHER_ALGS[essiv][0], essiv_key) if essiv else None
    functions = (data.encrypt, data.decrypt, tweak.encrypt if tweak else 0,
                 ess.encrypt if ess else 0)
    schedules = (data.key_enc, data.key_dec, tweak.key_enc if tweak else 0,
                 ess.key_enc if ess else 0)
    return BlockSectorCipher(functions, schedules, block, _MODES[mode], ivgen,
                             (data, tweak, ess))


def _crypt(cipher, data, encrypt):
    """En/decrypt ``data`` from sector 0; a partial last sector is done as
    the prefix of a whole one (the same bytes in every mode used here)."""
    n = len(data)
    buf = bytearray(data) + bytes(-n % L.SECTOR_SIZE)
    (cipher.encrypt if encrypt else cipher.decrypt)(buf, 0)
    return bytes(buf[:n])


# -- the anti-forensic splitter -----------------------------------------------------------

def _diffuse(block, hash_alg):
    digest = L.HASH_ALGS[hash_alg]
    out = bytearray()
    for i in range(0, len(block), digest):
        piece = block[i:i + digest]
        out += hashlib.new(hash_alg, (i // digest).to_bytes(4, "big") + piece).digest()[:len(piece)]
    return bytes(out)


def _xor(a, b):
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def af_merge(split, key_bytes, stripes, hash_alg):
    block = bytes(key_bytes)
    for i in range(stripes - 1):
        block = _diffuse(_xor(block, split[i * key_bytes:(i + 1) * key_bytes]), hash_alg)
    return _xor(block, split[(stripes - 1) * key_bytes:stripes * key_bytes])


def af_split(key, stripes, hash_alg):
    n = len(key)
    pieces = [os.urandom(n) for _ in range(stripes - 1)]
    block = bytes(n)
    for p in pieces:
        block = _diffuse(_xor(block, p), hash_alg)
    return b"".join(pieces) + _xor(key, block)


# -- PBKDF2 -------------------------------------------------------------------------------

def pbkdf2(hash_alg, secret, salt, iterations, length):
    return hashlib.pbkdf2_hmac(hash_alg, secret, salt, iterations, length)


def iterations_for(hash_alg, length, iter_time_ms):
    """PBKDF2 iterations that take ``iter_time_ms`` here (qemu's
    qcrypto_pbkdf2_count_iters scaled by iter-time), measured over at most
    a tenth of that time (and at least 1000 iterations)."""
    if iter_time_ms <= 0:
        raise InvalidArgumentError("encrypt.iter-time must be positive")
    n, budget = 1000, max(iter_time_ms / 10000, 0.002)
    while True:
        t = time.perf_counter()
        pbkdf2(hash_alg, b"\0" * 8, b"\0" * L.SALT_LEN, n, length)
        dt = time.perf_counter() - t
        if dt >= budget or n >= 1 << 22:
            return int(n / max(dt, 1e-9) * iter_time_ms / 1000)
        n *= 2


def _bounded(iters, what):
    if iters > L.MAX_ITERATIONS:
        raise InvalidArgumentError(f"{what}: encrypt.iter-time asks for {iters} PBKDF2 "
                                   f"iterations, above the limit of {L.MAX_ITERATIONS} that "
                                   "qcow2fast opens")
    return max(iters, L.MIN_ITERATIONS)


# -- key slots ----------------------------------------------------------------------------

def slot_cipher(h, key):
    return make_cipher(h.cipher_alg, h.mode, h.ivgen_alg, h.ivgen_hash_alg, key)


def load_key(h, i, passphrase, read):
    """The master key if slot ``i`` opens with ``passphrase``, else None."""
    s = h.slots[i]
    if not s.enabled:
        return None
    slot_key = pbkdf2(h.hash_spec, passphrase.value, s.salt, s.iterations, h.key_bytes)
    material = read(s.key_offset * L.SECTOR_SIZE, h.key_bytes * s.stripes)
    cipher = slot_cipher(h, slot_key)
    try:
        split = _crypt(cipher, material, False)
    finally:
        cipher.close()
    key = af_merge(split, h.key_bytes, s.stripes, h.hash_spec)
    digest = pbkdf2(h.hash_spec, key, h.mk_digest_salt, h.mk_digest_iter, L.DIGEST_LEN)
    return key if hmac.compare_digest(digest, h.mk_digest) else None


def find_key(h, passphrase, read):
    """(slot, master key) of the first slot ``passphrase`` opens."""
    for i in range(L.NUM_KEY_SLOTS):
        key = load_key(h, i, passphrase, read)
        if key is not None:
            return i, key
    raise BadPassphraseError("Invalid password, cannot unlock any keyslot")


def store_key(h, i, passphrase, key, iter_time, write, barrier):
    """Put ``key`` in slot ``i`` under ``passphrase``.  Order: key material,
    barrier, then the header marks the slot active (a crash leaves the slot
    as it was)."""
    s = h.slots[i]
    s.salt = os.urandom(L.SALT_LEN)
    s.iterations = _bounded(iterations_for(h.hash_spec, h.key_bytes, iter_time), f"keyslot {i}")
    slot_key = pbkdf2(h.hash_spec, passphrase.value, s.salt, s.iterations, h.key_bytes)
    cipher = slot_cipher(h, slot_key)
    try:
        material = _crypt(cipher, af_split(key, s.stripes, h.hash_spec), True)
    finally:
        cipher.close()
    write(s.key_offset * L.SECTOR_SIZE, material)
    barrier()
    s.active = L.SLOT_ENABLED
    write(0, h.pack())


def erase_key(h, i, write, barrier):
    """Disable slot ``i`` (header first, barrier), then overwrite its key
    material with random bytes ERASE_ITERATIONS times, as qemu does."""
    s = h.slots[i]
    s.salt, s.iterations, s.active = bytes(L.SALT_LEN), 0, L.SLOT_DISABLED
    write(0, h.pack())
    barrier()
    n = h.key_bytes * s.stripes
    for _ in range(L.ERASE_ITERATIONS):
        write(s.key_offset * L.SECTOR_SIZE, os.urandom(n))


def validate_choice(cipher_alg="aes-256", cipher_mode="xts", ivgen_alg="plain64",
                    ivgen_hash_alg=None, hash_alg="sha256"):
    """qemu's rules for a new volume's algorithms, and libcrypto having
    them; the choice with qemu's defaults filled in.  A bad value is named
    as qemu names it: by the key inside ``encrypt.`` ('cipher-alg')."""
    if cipher_alg not in L.CIPHER_ALGS:
        raise InvalidArgumentError(f"Parameter 'cipher-alg' does not accept value "
                                   f"'{cipher_alg}'")
    if cipher_mode not in L.CIPHER_MODES:
        raise InvalidArgumentError(f"Parameter 'cipher-mode' does not accept value "
                                   f"'{cipher_mode}'")
    if ivgen_alg not in L.IVGEN_ALGS:
        raise InvalidArgumentError(f"Parameter 'ivgen-alg' does not accept value "
                                   f"'{ivgen_alg}'")
    for field, value in (("ivgen-hash-alg", ivgen_hash_alg), ("hash-alg", hash_alg)):
        if value is not None and value not in L.HASH_ALGS:
            raise InvalidArgumentError(f"Parameter '{field}' does not accept value "
                                       f"'{value}'")
    if ivgen_alg == "essiv" and ivgen_hash_alg is None:
        ivgen_hash_alg = "sha256"
    key_bytes = L.key_bytes_for(cipher_alg, cipher_mode)
    if key_bytes * L.STRIPES % L.SECTOR_SIZE:
        # qemu 7.2 aborts on key material that is not whole sectors (aes-192
        # outside XTS): an image it could never open is not made.
        raise UnsupportedFeatureError(
            f"cipher {cipher_alg} in {cipher_mode} mode: its key material "
            f"({key_bytes * L.STRIPES} bytes) is not whole 512-byte sectors, which qemu "
            "7.2 cannot read", feature="encrypt.cipher-alg")
    check_cipher(cipher_alg, cipher_mode)
    if ivgen_alg == "essiv":
        check_cipher(L.essiv_cipher(cipher_alg, ivgen_hash_alg), "ecb")
    return cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg, hash_alg


def new_header(cipher_alg="aes-256", cipher_mode="xts", ivgen_alg="plain64",
               ivgen_hash_alg=None, hash_alg="sha256", iter_time=L.DEFAULT_ITER_TIME_MS):
    """(header with no active slot, master key) of a new LUKS volume, with
    qemu's defaults and layout."""
    cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg, hash_alg = validate_choice(
        cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg, hash_alg)
    key_bytes = L.key_bytes_for(cipher_alg, cipher_mode)
    mode_spec = f"{cipher_mode}-{ivgen_alg}" + (f":{ivgen_hash_alg}" if ivgen_hash_alg else "")
    offsets, payload = L.layout(key_bytes)
    h = L.LuksHeader(cipher_name=L.CIPHER_ALGS[cipher_alg][0], cipher_mode=mode_spec,
                     hash_spec=hash_alg, payload_offset=payload, key_bytes=key_bytes,
                     mk_digest_salt=os.urandom(L.SALT_LEN), uuid=str(uuidlib.uuid4()),
                     slots=[L.KeySlot(key_offset=o) for o in offsets],
                     cipher_alg=cipher_alg, mode=cipher_mode, ivgen_alg=ivgen_alg,
                     ivgen_hash_alg=ivgen_hash_alg)
    key = os.urandom(key_bytes)
    slot_cipher(h, key).close()         # refuses a cipher not available here, before any write
    h.mk_digest_iter = _bounded(iterations_for(hash_alg, L.DIGEST_LEN, iter_time) // 8,
                                "master key digest")
    h.mk_digest = pbkdf2(hash_alg, key, h.mk_digest_salt, h.mk_digest_iter, L.DIGEST_LEN)
    return h, key
