"""Hostile LUKS headers and encryption extensions: a clear error naming the
field, in bounded time, nothing written (the image bytes are unchanged)."""

import struct

import pytest

import qcow2fast
from qcow2fast.spec import header as hdr
from qcow2fast.spec import luks as L

PW = b"pw"
MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "e.qcow2"
    qcow2fast.create(path, MiB, encrypt={"format": "luks", "key_secret": PW, "iter_time": 10})
    with qcow2fast.open(path, "r+", key_secret=PW) as img:
        img.write(0, b"data" * 1024)
        area = img.encryption.area
    return path, area


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def expect_error(path, exc, match, mode="r", key_secret=PW):
    before = path.read_bytes()
    with pytest.raises(exc, match=match) as info:
        qcow2fast.open(path, mode, key_secret=key_secret)
    assert path.read_bytes() == before
    return info.value


SLOT0 = L.HEADER.size


@pytest.mark.parametrize("what,at,data,exc,match,field", [
    ("magic", 0, b"LUKZ", qcow2fast.CorruptImageError, "not in LUKS format", "luks.magic"),
    ("version", 6, struct.pack(">H", 2), qcow2fast.UnsupportedFeatureError,
     "LUKS version 2 is not supported", None),
    ("cipher key size", 8, b"cast5\0", qcow2fast.UnsupportedFeatureError,
     "Algorithm 'cast5' with key size 32 bytes not supported", None),
    ("unknown cipher", 8, b"rot13\0", qcow2fast.UnsupportedFeatureError,
     "Algorithm 'rot13' with key size 32 bytes not supported", None),
    ("unterminated name", 8, b"a" * 32, qcow2fast.CorruptImageError,
     "cipher name is not NUL terminated", "luks.cipher_name"),
    ("cipher mode", 40, b"xts\0", qcow2fast.UnsupportedFeatureError,
     "Unexpected cipher mode string format", None),
    ("hash", 72, b"whirlpool\0", qcow2fast.UnsupportedFeatureError,
     "Hash algorithm 'whirlpool' not supported", None),
    ("payload offset", 104, struct.pack(">I", 4), qcow2fast.CorruptImageError,
     "payload is overlapping with the header", "luks.payload_offset"),
    ("payload past area", 104, struct.pack(">I", 1 << 30), qcow2fast.CorruptImageError,
     "past the .*encryption header area", "luks.payload_offset"),
    ("huge master iterations", 164, struct.pack(">I", 0xFFFFFFFF),
     qcow2fast.CorruptImageError, "above the limit", "luks.mk_digest_iter"),
    ("zero master iterations", 164, struct.pack(">I", 0), qcow2fast.CorruptImageError,
     "is zero", "luks.mk_digest_iter"),
    ("huge slot iterations", SLOT0 + 4, struct.pack(">I", 0xFFFFFFFF),
     qcow2fast.CorruptImageError, "Keyslot 0 iteration count .* above the limit",
     "luks.slot0.iterations"),
    ("slot state", SLOT0, struct.pack(">I", 7), qcow2fast.CorruptImageError,
     "Keyslot 0 state", "luks.slot0.active"),
    ("stripes", SLOT0 + 44, struct.pack(">I", 1 << 30), qcow2fast.CorruptImageError,
     r"stripes 1073741824 != 4000", "luks.slot0.stripes"),
    ("key material outside", SLOT0 + 40, struct.pack(">I", 1 << 31),
     qcow2fast.CorruptImageError, "overlapping with the encrypted payload",
     "luks.slot0.key_offset"),
    ("overlapping slots", SLOT0 + 48 + 40, struct.pack(">I", 8), qcow2fast.CorruptImageError,
     "Keyslots 0 and 1 are overlapping", "luks.slot1.key_offset"),
])
def test_bad_luks_header(image, what, at, data, exc, match, field):
    path, (off, _) = image
    patch(path, off + at, data)
    e = expect_error(path, exc, match)
    if field is not None:
        assert e.field == field


def test_total_iterations_bounded(tmp_path):
    """Eight active slots each under the per-slot limit, over the total."""
    path = tmp_path / "t.qcow2"
    qcow2fast.create(path, MiB, encrypt={"format": "luks", "key_secret": PW, "iter_time": 10})
    with qcow2fast.open(path, no_io=True) as img:
        off = img.encryption.area[0]
    for i in range(L.NUM_KEY_SLOTS):
        patch(path, off + SLOT0 + i * L.KEY_SLOT.size,
              struct.pack(">II", L.SLOT_ENABLED, L.MAX_ITERATIONS))
    e = expect_error(path, qcow2fast.CorruptImageError, "above the limit")
    assert e.field == "luks.slot iterations"


def _crypto_ext_offset(path):
    """Host offset of the crypto extension's payload in the header cluster."""
    buf = path.read_bytes()[:65536]
    pos = hdr.V3_HEADER_LENGTH
    while True:
        kind, length = hdr.EXT_HEADER.unpack_from(buf, pos)
        if kind == hdr.EXT_CRYPTO:
            return pos + hdr.EXT_HEADER.size
        assert kind != hdr.EXT_END
        pos += hdr.EXT_HEADER.size + length + (-length % 8)


@pytest.mark.parametrize("offset,length,match", [
    (65536 * 1000, 2 << 20, "not inside the file"),           # points past the end
    (None, 1 << 40, "or larger than"),          # lying length
    (12345, 2 << 20, "not a multiple of cluster size"),
    (None, 100, "truncated"),                                  # truncated LUKS header
])
def test_bad_crypto_extension(image, offset, length, match):
    path, (off, _) = image
    patch(path, _crypto_ext_offset(path), L.CRYPTO_EXT.pack(offset or off, length))
    expect_error(path, qcow2fast.Qcow2Error, match)


def test_crypt_method_without_extension_and_unknown_method(image):
    path, _ = image
    ext = _crypto_ext_offset(path) - hdr.EXT_HEADER.size
    patch(path, ext, struct.pack(">I", 0x12345678))       # the extension becomes unknown
    expect_error(path, qcow2fast.CorruptImageError, "without its header extension")
    patch(path, hdr.FIELD_OFFSET["crypt_method"], struct.pack(">I", 3))
    expect_error(path, qcow2fast.UnsupportedFeatureError, "Unsupported encryption method: 3")


def test_truncated_key_material(image):
    """The file cut inside the key material: an error, no crash."""
    path, (off, _) = image
    data = path.read_bytes()
    path.write_bytes(data[:off + 8192])
    with pytest.raises(qcow2fast.Qcow2Error):
        qcow2fast.open(path, key_secret=PW)


def test_encrypted_without_secret_writes_nothing(image):
    path, _ = image
    expect_error(path, qcow2fast.InvalidArgumentError,
                 "Parameter 'encrypt.key-secret' is required for cipher", mode="r+",
                 key_secret=None)


def test_compressed_write_refused(image):
    path, _ = image
    with qcow2fast.open(path, "r+", key_secret=PW) as img:
        with pytest.raises(qcow2fast.UnsupportedFeatureError):
            img.write_compressed(0, b"\0" * img.cluster_size)
