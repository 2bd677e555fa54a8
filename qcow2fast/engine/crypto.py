"""Encrypted qcow2 images (qemu's qcow2.c: crypt_method, the full disk
encryption header extension, qcow2_crypto_hdr_{read,init,write}_func).

``crypt_method`` 2 is LUKS: the header extension 0x0537be77 gives the
offset and length of the LUKS area (a LUKS1 header and its key material,
in clusters of its own); the payload offset inside it is not used, and
each 512-byte sector of guest data is encrypted with the master key as
sector number host offset / 512 (qemu's crypt_physical_offset).
``crypt_method`` 1 is qemu's legacy AES-CBC (crypto/block-qcow.c): no
header, the key is the passphrase itself cut or zero-padded to 16 bytes,
each sector encrypted with AES-128-CBC and the plain64 IV of its *guest*
offset / 512 (qemu: crypt_physical_offset false).  It is broken by design
(same key and IVs for every image with that passphrase, no check of the
passphrase: a wrong one reads garbage); qemu 7.2's qemu-img, qemu-io and
qemu-nbd read, write and create it without a warning (only its system
emulators refuse it), and so does qcow2fast.

An encrypted image's data goes through a ``SectorTransform`` installed as
the state's data transform: no data reaches the caller undecrypted and the
plain C path is never taken.
"""

from .._ext.hooks import DataTransform
from .._ext.sectorcipher import SectorTransform
from ..errors import (BadPassphraseError, CorruptImageError, InvalidArgumentError,
                      MissingSecretError, Qcow2Error, UnsupportedFeatureError)
from ..spec import header as hdr
from ..spec import luks as L
from .secret import Secret

# qemu's message.
NEED_SECRET = "Parameter 'encrypt.key-secret' is required for cipher"
# The LUKS area of qemu's images is 2 MiB at most (8 slots of 4000 stripes
# of a 64-byte key); a larger extension is refused before anything is read.
MAX_LUKS_AREA = 32 << 20


class Encryption:
    """What an open image knows of its encryption: the LUKS header (None
    for legacy AES), where it lives, and the master key's cipher once
    unlocked."""

    def __init__(self, method, area=None, header=None):
        self.method = method
        self.area = area                # (host offset, length) of the LUKS area
        self.header = header
        self.cipher = None

    def __repr__(self):
        return f"<Encryption {'luks' if self.method == L.CRYPT_LUKS else 'aes'}>"

    def info(self):
        """qemu-img info's "encrypt" block (QCryptoBlockInfo), qemu's key order."""
        if self.method == L.CRYPT_AES:
            return {"format": "aes"}
        h = self.header
        out = {"ivgen-alg": h.ivgen_alg, "hash-alg": h.hash_spec, "cipher-alg": h.cipher_alg,
               "uuid": h.uuid}
        if h.ivgen_alg == "essiv":
            out["ivgen-hash-alg"] = h.ivgen_hash_alg
        out.update({"format": "luks", "cipher-mode": h.mode, "slots": [],
                    "payload-offset": h.payload_offset * L.SECTOR_SIZE,
                    "master-key-iters": h.mk_digest_iter})
        for s in h.slots:
            slot = {"active": s.enabled}
            if s.enabled:
                slot["iters"] = s.iterations
            slot["key-offset"] = s.key_offset * L.SECTOR_SIZE
            if s.enabled:
                slot["stripes"] = s.stripes
            out["slots"].append(slot)
        return out

    # -- the LUKS area --------------------------------------------------------------------

    def reader(self, f):
        off, length = self.area

        def read(at, n):
            if at + n > length:
                raise CorruptImageError(f"LUKS key material [{at}, {at + n}) is outside the "
                                        f"{length}-byte encryption header area",
                                        offset=off + at, field="luks.key_offset")
            data = f.pread(off + at, n)
            if len(data) < n:
                raise CorruptImageError("LUKS key material runs past the end of the file",
                                        offset=off + at, field="luks.key_offset")
            return data
        return read

    def writer(self, f):
        off, length = self.area

        def write(at, data):
            if at + len(data) > length:
                raise InvalidArgumentError("Request for data outside of extension header")
            f.pwrite(data, off + at)
        return write


def crypto_area(h):
    """(offset, length) the crypto header extension names, or None."""
    for e in h.other_extensions:
        if e.type == hdr.EXT_CRYPTO:
            if len(e.data) != L.CRYPTO_EXT.size:
                raise CorruptImageError(f"CRYPTO header extension size {len(e.data)}, but "
                                        f"expected size {L.CRYPTO_EXT.size}",
                                        field="crypto header extension")
            return L.CRYPTO_EXT.unpack(e.data)
    return None


def read_encryption(f, h, file_size):
    """The Encryption of the image with header ``h`` (None if it has
    none), its LUKS header parsed and bounded by the file; no key used."""
    area = crypto_area(h)
    if h.crypt_method == L.CRYPT_NONE:
        if area is not None:
            raise CorruptImageError("CRYPTO header extension only expected with LUKS "
                                    "encryption method", field="crypto header extension")
        return None
    if h.crypt_method == L.CRYPT_AES:
        return Encryption(L.CRYPT_AES)
    if h.crypt_method != L.CRYPT_LUKS:
        raise UnsupportedFeatureError(f"Unsupported encryption method: {h.crypt_method}",
                                      feature="crypt_method")
    if area is None:
        raise CorruptImageError("LUKS encryption without its header extension (0x0537be77)",
                                field="crypto header extension")
    off, length = area
    cs = h.cluster_size
    if off % cs:
        raise CorruptImageError(f"Encryption header offset '{off}' is not a multiple of "
                                f"cluster size '{cs}'", offset=off, field="crypto header offset")
    if off == 0 or length > MAX_LUKS_AREA or off + length > file_size:
        raise CorruptImageError(f"encryption header area [{off:#x}, +{length}) is not inside "
                                f"the file ({file_size} bytes) or larger than "
                                f"{MAX_LUKS_AREA} bytes", offset=off, field="crypto header")
    return Encryption(L.CRYPT_LUKS, area,
                      L.parse(f.pread(off, min(length, L.HEADER_SIZE)), length, off))


def legacy_aes_key(secret):
    """qemu's key for legacy AES-CBC (qcrypto_block_qcow_init): the
    passphrase, valid UTF-8 without NUL (g_utf8_validate), cut or
    zero-padded to 16 bytes."""
    pw = secret.value
    try:
        pw.decode("utf-8")
    except UnicodeDecodeError:
        pw = b"\0"
    if b"\0" in pw:
        raise InvalidArgumentError("Data from secret is not valid UTF-8")
    pw = pw[:L.LEGACY_AES_KEY_BYTES]
    return pw + bytes(L.LEGACY_AES_KEY_BYTES - len(pw))


def legacy_aes_transform(secret):
    """The data transform of a legacy AES-CBC image with passphrase ``secret``."""
    from . import luks      # (binds libcrypto: not for check or info of a plain image)
    cipher = luks.make_cipher(*L.LEGACY_AES, legacy_aes_key(secret))
    return cipher, SectorTransform(L.SECTOR_SIZE, cipher, by_guest=True)


def unlock(enc, f, key_secret):
    """Install nothing; return the transform for the image's data once the
    key slot ``key_secret`` opens is found (legacy AES: any passphrase)."""
    if key_secret is None:
        raise MissingSecretError(NEED_SECRET)
    if enc.method == L.CRYPT_AES:
        enc.cipher, transform = legacy_aes_transform(Secret(key_secret))
        return transform
    from . import luks
    h = enc.header
    _, key = luks.find_key(h, Secret(key_secret), enc.reader(f))
    enc.cipher = luks.make_cipher(h.cipher_alg, h.mode, h.ivgen_alg, h.ivgen_hash_alg, key)
    return SectorTransform(L.SECTOR_SIZE, enc.cipher)


def metadata_clusters(enc, cluster_bits):
    """(first cluster, count) of the LUKS area, for the metadata map and check."""
    if enc is None or enc.area is None:
        return None
    off, length = enc.area
    return off >> cluster_bits, -(-max(length, 1) // (1 << cluster_bits))


class LockedTransform(DataTransform):
    """The transform of an encrypted image opened without its secret
    (``no_io``, as qemu-img info opens): metadata only, no data."""

    def decode(self, buf, host, guest):
        raise MissingSecretError(NEED_SECRET)

    def encode(self, buf, host, guest):
        raise MissingSecretError(NEED_SECRET)


def attach(state, f, file_size, key_secret, no_io, inherited=False):
    """Read the image's encryption, unlock it with ``key_secret`` and
    install its transform in ``state``; the LUKS area joins the metadata
    map.  Returns the Encryption, or None for a plain image.  A passphrase
    ``inherited`` from the image above in a chain (given for all layers,
    not for this one) does not open legacy AES, which cannot tell a wrong
    one (it would read garbage): as qemu, it needs its own; a LUKS layer
    it does not open is one given no secret, as qemu says."""
    enc = read_encryption(f, state.header, file_size)
    if enc is None:
        return None
    if inherited and enc.method == L.CRYPT_AES:
        key_secret = None
    span = metadata_clusters(enc, state.cluster_bits)
    if span is not None:
        state.metadata.add(*span)
    if no_io and key_secret is None:
        state.set_transform(LockedTransform(L.SECTOR_SIZE))
    elif inherited:
        try:
            state.set_transform(unlock(enc, f, key_secret))
        except BadPassphraseError:      # none of its own: qemu's words for that
            raise MissingSecretError(NEED_SECRET) from None
    else:
        state.set_transform(unlock(enc, f, key_secret))
    return enc


def header_ranges(h):
    """[(offset, nbytes, what)] of the LUKS area, as qemu's check counts it
    (qcow2_check_refcounts: the crypto header's offset and length); a bad
    extension counts nothing (opening the image reports it)."""
    try:
        area = crypto_area(h) if h.crypt_method == L.CRYPT_LUKS else None
    except CorruptImageError:
        return []
    return [] if area is None or not area[1] else [(area[0], area[1], "the LUKS header")]


def unlock_for_check(path, key_secret=None, **open_kw):
    """What qemu's check does first: open the image with its backing chain
    and data file, so that a missing secret or a wrong passphrase (of any
    layer, ``key_secret`` as Image takes it, ``open_kw`` Image's other
    options) or a backing file that does not open fails the check (check
    itself reads the top's metadata only).  The top's own defects are
    check's to report: a plain top's open errors count only when they come
    from a layer below (``layer``, chain.py).  A plain image with neither
    backing nor data file is not opened."""
    from .backing import read_head      # (a remote image too)
    from .image import Image
    f = hdr.FIELD_OFFSET
    end = f["incompatible_features"] + 8
    head = read_head(path, end)
    if len(head) < f["crypt_method"] + 4:
        return

    def field(name, n):
        return int.from_bytes(head[f[name]:f[name] + n], "big") if len(head) >= f[name] + n \
            else 0
    encrypted = bool(field("crypt_method", 4))
    if not (encrypted or field("backing_file_offset", 8) or
            field("version", 4) >= 3 and
            field("incompatible_features", 8) & hdr.INCOMPAT_DATA_FILE):
        return
    try:
        Image(path, "r", key_secret=key_secret, locking=False, cache_clean_interval=0,
              **open_kw).close()
    except Qcow2Error as e:
        if encrypted or getattr(e, "layer", None):
            raise
