"""The LUKS1 header (cryptsetup's on-disk format 1.2.1, as qemu's
crypto/block-luks.c reads and writes it) and the qcow2 full disk
encryption header extension that points at it (qcow2.txt, 0x0537be77).

One ``struct`` per structure drives parse and pack.  Parsing applies
qemu's checks (qcrypto_block_luks_check_header, parse_header) and bounds
what a lying header could make us spend: key material inside the
extension's clusters, iteration counts under ``MAX_ITERATIONS``.
"""

import dataclasses
import struct

from ..errors import CorruptImageError, UnsupportedFeatureError

# qcow2 header: crypt_method values, the extension's payload.
CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
# Legacy AES-CBC (crypt_method 1, qemu's crypto/block-qcow.c): the cipher,
# mode, IV generator and IV hash it is hardwired to, and its key size.
LEGACY_AES = ("aes-128", "cbc", "plain64", None)
LEGACY_AES_KEY_BYTES = 16
CRYPTO_EXT = struct.Struct(">QQ")           # offset, length of the LUKS header clusters

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
SECTOR_SIZE = 512
NUM_KEY_SLOTS = 8
STRIPES = 4000
SALT_LEN = 32
DIGEST_LEN = 20
KEY_SLOT_OFFSET = 4096                      # the first key material, in bytes
HEADER_SECTORS = KEY_SLOT_OFFSET // SECTOR_SIZE
MIN_ITERATIONS = 1000                       # qemu's MIN_SLOT_KEY_ITERS / MIN_MASTER_KEY_ITERS
SLOT_ENABLED, SLOT_DISABLED = 0x00AC71F3, 0x0000DEAD
ERASE_ITERATIONS = 16                       # qemu overwrites erased key material 16 times
DEFAULT_ITER_TIME_MS = 2000

# Work a hostile header may ask of an open: PBKDF2 iterations per count
# (a slot's, the master key digest's) and in all (a wrong passphrase tries
# every active slot, and the digest after each).  qemu's 2 s default gives
# a few million per slot on a fast machine; sha256 PBKDF2 runs about 1.4
# million iterations a second here, so an open is bounded by ~12 s per slot
# and ~50 s in all.  Above these: refused, naming the field.
MAX_ITERATIONS = 1 << 24
MAX_TOTAL_ITERATIONS = 1 << 26

KEY_SLOT = struct.Struct(">II32sII")       # active, iterations, salt, key_offset, stripes
HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")   # up to the key slots
HEADER_SIZE = HEADER.size + NUM_KEY_SLOTS * KEY_SLOT.size       # 592

# Names, as qemu spells them (qapi/crypto.json) and as LUKS stores them.
CIPHER_ALGS = {     # qemu name -> (LUKS cipher_name, key bytes, block bytes)
    "aes-128": ("aes", 16, 16), "aes-192": ("aes", 24, 16), "aes-256": ("aes", 32, 16),
    "cast5-128": ("cast5", 16, 8),
    "serpent-128": ("serpent", 16, 16), "serpent-192": ("serpent", 24, 16),
    "serpent-256": ("serpent", 32, 16),
    "twofish-128": ("twofish", 16, 16), "twofish-192": ("twofish", 24, 16),
    "twofish-256": ("twofish", 32, 16),
}
CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
IVGEN_ALGS = ("plain", "plain64", "essiv")
HASH_ALGS = {"md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48,
             "sha512": 64, "ripemd160": 20}


@dataclasses.dataclass
class KeySlot:
    active: int = SLOT_DISABLED
    iterations: int = 0
    salt: bytes = b"\0" * SALT_LEN
    key_offset: int = 0                 # in sectors
    stripes: int = STRIPES

    @property
    def enabled(self):
        return self.active == SLOT_ENABLED


@dataclasses.dataclass
class LuksHeader:
    cipher_name: str = "aes"
    cipher_mode: str = "xts-plain64"
    hash_spec: str = "sha256"
    payload_offset: int = 0             # in sectors
    key_bytes: int = 64
    mk_digest: bytes = b"\0" * DIGEST_LEN
    mk_digest_salt: bytes = b"\0" * SALT_LEN
    mk_digest_iter: int = 0
    uuid: str = ""
    slots: list = dataclasses.field(default_factory=list)
    # What cipher_name/cipher_mode/key_bytes mean, in qemu's names (parse sets them).
    cipher_alg: str = "aes-256"
    mode: str = "xts"
    ivgen_alg: str = "plain64"
    ivgen_hash_alg: str = None

    def pack(self):
        out = HEADER.pack(MAGIC, VERSION, self.cipher_name.encode(), self.cipher_mode.encode(),
                          self.hash_spec.encode(), self.payload_offset, self.key_bytes,
                          self.mk_digest, self.mk_digest_salt, self.mk_digest_iter,
                          self.uuid.encode())
        return out + b"".join(KEY_SLOT.pack(s.active, s.iterations, s.salt, s.key_offset,
                                            s.stripes) for s in self.slots)

    def split_key_sectors(self):
        """Sectors of one slot's key material, rounded as qemu lays them out."""
        n = -(-self.key_bytes * STRIPES // SECTOR_SIZE)
        return -(-n // HEADER_SECTORS) * HEADER_SECTORS

    def slot_offset(self, i):
        """Byte offset of slot i's key material."""
        return self.slots[i].key_offset * SECTOR_SIZE


def layout(key_bytes):
    """(key slot offsets in sectors, payload offset in sectors) of a new
    header, as qemu lays it out (qcrypto_block_luks_create)."""
    h = LuksHeader(key_bytes=key_bytes)
    n = h.split_key_sectors()
    return [HEADER_SECTORS + i * n for i in range(NUM_KEY_SLOTS)], \
        HEADER_SECTORS + NUM_KEY_SLOTS * n


def key_bytes_for(cipher_alg, mode):
    return CIPHER_ALGS[cipher_alg][1] * (2 if mode == "xts" else 1)


def _bad(msg, field, at, base):
    raise CorruptImageError(f"LUKS header: {msg}", offset=base + at, field=f"luks.{field}")


def _cstr(raw, field, at, base):
    if b"\0" not in raw:
        _bad(f"{field.replace('_', ' ')} is not NUL terminated", field, at, base)
    try:
        return raw.split(b"\0", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        _bad(f"{field.replace('_', ' ')} is not ASCII", field, at, base)


def parse(buf, length, base=0):
    """Parse the LUKS header at the start of ``buf`` (the extension's
    clusters, ``length`` bytes of which are the LUKS area); ``base`` is its
    host offset (for messages).  Checks qemu's rules and our bounds."""
    if len(buf) < HEADER_SIZE or length < HEADER_SIZE:
        _bad(f"truncated: {min(len(buf), length)} bytes, the header takes {HEADER_SIZE}",
             "magic", 0, base)
    (magic, version, cname, cmode, hspec, payload, key_bytes, digest, dsalt, diter,
     uuid) = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        _bad("Volume is not in LUKS format", "magic", 0, base)
    if version != VERSION:
        raise UnsupportedFeatureError(f"LUKS version {version} is not supported",
                                      feature="luks.version")
    h = LuksHeader(cipher_name=_cstr(cname, "cipher_name", 8, base),
                   cipher_mode=_cstr(cmode, "cipher_mode", 40, base),
                   hash_spec=_cstr(hspec, "hash_spec", 72, base),
                   payload_offset=payload, key_bytes=key_bytes, mk_digest=digest,
                   mk_digest_salt=dsalt, mk_digest_iter=diter,
                   uuid=uuid.split(b"\0", 1)[0].decode("ascii", "replace"))
    _parse_names(h, base)
    if payload < HEADER_SECTORS:
        _bad("LUKS payload is overlapping with the header", "payload_offset", 104, base)
    if payload * SECTOR_SIZE > length:
        _bad(f"payload offset {payload * SECTOR_SIZE} is past the {length}-byte "
             "encryption header area", "payload_offset", 104, base)
    if not 0 < diter <= MAX_ITERATIONS:
        _bad(f"master key iteration count {diter} is "
             f"{'zero' if not diter else f'above the limit of {MAX_ITERATIONS}'}",
             "mk_digest_iter", 164, base)
    n = h.split_key_sectors()
    for i in range(NUM_KEY_SLOTS):
        at = HEADER.size + i * KEY_SLOT.size
        s = KeySlot(*KEY_SLOT.unpack_from(buf, at))
        h.slots.append(s)
        if s.stripes != STRIPES:
            _bad(f"Keyslot {i} is corrupted (stripes {s.stripes} != {STRIPES})",
                 f"slot{i}.stripes", at + 44, base)
        if s.active not in (SLOT_ENABLED, SLOT_DISABLED):
            _bad(f"Keyslot {i} state (active/disable) is corrupted", f"slot{i}.active", at,
                 base)
        if s.enabled and not 0 < s.iterations <= MAX_ITERATIONS:
            _bad(f"Keyslot {i} iteration count {s.iterations} is "
                 f"{'zero' if not s.iterations else f'above the limit of {MAX_ITERATIONS}'}",
                 f"slot{i}.iterations", at + 4, base)
        if s.key_offset < HEADER_SECTORS:
            _bad(f"Keyslot {i} is overlapping with the LUKS header", f"slot{i}.key_offset",
                 at + 40, base)
        if s.key_offset + n > payload:
            _bad(f"Keyslot {i} is overlapping with the encrypted payload",
                 f"slot{i}.key_offset", at + 40, base)
        for j, o in enumerate(h.slots[:i]):
            if s.key_offset < o.key_offset + n and o.key_offset < s.key_offset + n:
                _bad(f"Keyslots {j} and {i} are overlapping in the header",
                     f"slot{i}.key_offset", at + 40, base)
    total = sum(s.iterations + diter for s in h.slots if s.enabled)
    if total > MAX_TOTAL_ITERATIONS:
        _bad(f"the active key slots take {total} PBKDF2 iterations to try, above the limit "
             f"of {MAX_TOTAL_ITERATIONS}", "slot iterations", HEADER.size, base)
    return h


def _parse_names(h, base):
    """cipher_mode is <mode>-<ivgen>[:<ivhash>] (e.g. xts-plain64, cbc-essiv:sha256)."""
    mode, sep, ivgen = h.cipher_mode.partition("-")
    if not sep:
        raise UnsupportedFeatureError(f"Unexpected cipher mode string format "
                                      f"'{h.cipher_mode}'", feature="luks.cipher_mode")
    ivgen, sep, ivhash = ivgen.partition(":")
    if sep and ivhash not in HASH_ALGS:
        raise UnsupportedFeatureError(f"Hash algorithm '{ivhash}' not supported",
                                      feature="luks.cipher_mode")
    if mode not in CIPHER_MODES:
        raise UnsupportedFeatureError(f"Cipher mode '{mode}' not supported",
                                      feature="luks.cipher_mode")
    size = h.key_bytes // 2 if mode == "xts" else h.key_bytes
    for name, (luks_name, kb, _) in CIPHER_ALGS.items():
        if luks_name == h.cipher_name and kb == size:
            h.cipher_alg = name
            break
    else:
        raise UnsupportedFeatureError(f"Algorithm '{h.cipher_name}' with key size {size} "
                                      "bytes not supported", feature="luks.cipher_name")
    if h.hash_spec not in HASH_ALGS:
        raise UnsupportedFeatureError(f"Hash algorithm '{h.hash_spec}' not supported",
                                      feature="luks.hash_spec")
    if ivgen not in IVGEN_ALGS:
        raise UnsupportedFeatureError(f"IV generator '{ivgen}' not supported",
                                      feature="luks.cipher_mode")
    if ivgen == "essiv" and not sep:
        raise UnsupportedFeatureError("Missing IV generator hash specification",
                                      feature="luks.cipher_mode")
    h.mode, h.ivgen_alg, h.ivgen_hash_alg = mode, ivgen, ivhash if sep else None


def essiv_cipher(cipher_alg, ivhash):
    """The cipher ESSIV encrypts sector numbers with: the same family with
    the hash's digest length as key (qemu's qcrypto_block_luks_essiv_cipher)."""
    family, kb, _ = CIPHER_ALGS[cipher_alg]
    digest = HASH_ALGS[ivhash]
    if digest == kb:
        return cipher_alg
    for name, (fam, k, _) in CIPHER_ALGS.items():
        if fam == family and k == digest:
            return name
    fam_name = {"aes": "AES", "serpent": "Serpent", "twofish": "Twofish"}.get(family)
    if fam_name is None:
        raise UnsupportedFeatureError(f"Cipher {cipher_alg} not supported with essiv",
                                      feature="encrypt.ivgen-alg")
    raise UnsupportedFeatureError(f"No {fam_name} cipher with key size {digest} available",
                                  feature="encrypt.ivgen-hash-alg")
