"""LUKS inside qcow2, both ways against qemu-img 7.2: images qemu makes read
bit-exactly, images qcow2fast makes (and writes) read by qemu, check clean,
compare equal; every AES cipher mode and IV generator qemu offers (the
other ciphers: test_luks_ciphers.py); cluster sizes 4 KiB to 2 MiB,
extended L2, an encrypted layer in a backing chain."""

import numpy as np
import pytest

import qcow2fast
from qcow2fast.errors import BadPassphraseError
from tests.helpers.luks_util import (ITER_TIME, qemu_check_luks, qemu_compare_luks,
                                     qemu_create_luks, qemu_io_luks, qemu_raw_luks,
                                     write_pattern)
from tests.helpers.qemu_util import qemu_img, qemu_info

MiB = 1 << 20
PW = "correct horse"

# (cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg)
MODES = [
    ("aes-256", "xts", "plain64", None, "sha256"),
    ("aes-128", "xts", "plain", None, "sha1"),
    ("aes-128", "cbc", "essiv", "sha256", "sha256"),
    ("aes-256", "cbc", "plain64", None, "sha512"),
    ("aes-256", "cbc", "essiv", "sha256", "sha256"),
    ("aes-256", "ecb", "plain64", None, "sha256"),
    ("aes-128", "ctr", "plain64", None, "sha256"),
]


def mode_id(m):
    return "-".join(x for x in m if x)


def enc_kw(m):
    alg, mode, ivgen, ivhash, hashalg = m
    kw = {"cipher_alg": alg, "cipher_mode": mode, "ivgen_alg": ivgen, "hash_alg": hashalg}
    if ivhash:
        kw["ivgen_hash_alg"] = ivhash
    return kw


# Modes qemu-img creates here (each qemu-img create spends over a second
# timing PBKDF2 whatever iter-time says): the default, ESSIV, plain with sha1.
QEMU_MODES = [MODES[0], MODES[1], MODES[2]]


@pytest.fixture(scope="module")
def qemu_made(tmp_path_factory):
    """One image qemu created and wrote per mode of QEMU_MODES."""
    d = tmp_path_factory.mktemp("luks-qemu")
    out = {}
    for m in QEMU_MODES:
        path = d / f"{mode_id(m)}.qcow2"
        qemu_create_luks(path, 4 * MiB, PW, **enc_kw(m))
        qemu_io_luks(path, PW, "write -P 0x5a 0 100k", "write -P 0xc3 3000k 5k",
                     "write -P 0x11 4190000 4k")
        out[m] = path
    return out


@pytest.mark.parametrize("mode", QEMU_MODES, ids=mode_id)
def test_read_qemu_image(qemu_made, mode):
    want = bytearray(4 * MiB)
    want[:100 * 1024] = b"\x5a" * (100 * 1024)
    want[3000 * 1024:3005 * 1024] = b"\xc3" * 5120
    want[4190000:4194096] = b"\x11" * 4096
    with qcow2fast.open(qemu_made[mode], key_secret=PW) as img:
        assert img.read(0, img.size) == want
        assert img.encryption.info()["cipher-mode"] == mode[1]


@pytest.mark.parametrize("mode", QEMU_MODES[:1], ids=mode_id)
def test_write_qemu_image(qemu_made, tmp_path, mode):
    path = tmp_path / "w.qcow2"
    path.write_bytes(qemu_made[mode].read_bytes())
    with qcow2fast.open(path, "r+", key_secret=PW) as img:
        img.write(50000, b"\x01" * 100000)
        want = img.read(0, img.size)
    assert want[50000:150000] == b"\x01" * 100000
    assert qemu_raw_luks(path, PW, tmp_path) == want
    qemu_check_luks(path, PW)


def test_aes192_outside_xts_refused(tmp_path):
    """qemu 7.2 aborts on its key material (96000 bytes, not whole sectors)."""
    with pytest.raises(qcow2fast.UnsupportedFeatureError, match="whole 512-byte sectors"):
        qcow2fast.create(tmp_path / "x.qcow2", MiB,
                         encrypt={"format": "luks", "key_secret": PW, "cipher_alg": "aes-192",
                                  "cipher_mode": "cbc", "iter_time": ITER_TIME})
    assert not (tmp_path / "x.qcow2").exists()


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_qemu_reads_ours(tmp_path, mode):
    path = tmp_path / "o.qcow2"
    qcow2fast.create(path, 4 * MiB, encrypt={"format": "luks", "key-secret": PW,
                                             "iter-time": ITER_TIME, **enc_kw(mode)})
    with qcow2fast.open(path, "r+", key_secret=PW) as img:
        expect = bytearray(img.size)
        write_pattern(img.write, expect, 1)
    assert qemu_raw_luks(path, PW, tmp_path) == expect
    qemu_check_luks(path, PW)
    raw = tmp_path / "expect.raw"
    raw.write_bytes(expect)
    qemu_compare_luks(path, PW, raw)
    info = qemu_info(path)["format-specific"]["data"]["encrypt"]
    assert (info["cipher-alg"], info["cipher-mode"], info["ivgen-alg"]) == mode[:3]


@pytest.mark.parametrize("cluster_size,extended_l2,maker", [(4096, False, "qemu"),
                                                            (65536, True, "ours"),
                                                            (2 * MiB, False, "ours")])
def test_cluster_sizes_both_ways(tmp_path, cluster_size, extended_l2, maker):
    """qemu writes, we write over it, qemu reads the result and checks it."""
    path = tmp_path / "c.qcow2"
    if maker == "qemu":
        extra = ["-o", f"cluster_size={cluster_size},extended_l2={'on' if extended_l2 else 'off'}"]
        qemu_create_luks(path, 6 * MiB, PW, extra=extra)
    else:
        qcow2fast.create(path, 6 * MiB, cluster_size=cluster_size, extended_l2=extended_l2,
                         encrypt={"format": "luks", "key_secret": PW, "iter_time": ITER_TIME})
    qemu_io_luks(path, PW, "write -P 0x77 0 6M")
    expect = bytearray(b"\x77" * 6 * MiB)
    with qcow2fast.open(path, "r+", key_secret=PW) as img:
        assert img.read(0, img.size) == expect
        rng = np.random.default_rng(cluster_size)
        for off, n in ((100, 5000), (3 * MiB - 7, 9000)):
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            img.write(off, data)
            expect[off:off + n] = data
        img.write_zeroes(5 * MiB, 65536)
        expect[5 * MiB:5 * MiB + 65536] = bytes(65536)
    assert qemu_raw_luks(path, PW, tmp_path) == expect
    qemu_check_luks(path, PW)


def test_backing_chain_with_encrypted_layers(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qcow2fast.create(base, 2 * MiB, encrypt={"format": "luks", "key_secret": PW,
                                             "iter_time": ITER_TIME})
    qemu_io_luks(base, PW, "write -P 0x42 0 2M")
    qcow2fast.create(top, None, backing_file=str(base), backing_format="qcow2",
                     encrypt={"format": "luks", "key_secret": PW, "iter_time": ITER_TIME})
    with qcow2fast.open(top, "r+", key_secret=PW) as img:
        img.write(4096, b"\x99" * 512)
        got = img.read(0, img.size)
    expect = bytearray(b"\x42" * 2 * MiB)
    expect[4096:4608] = b"\x99" * 512
    assert got == expect
    assert qemu_raw_luks(top, PW, tmp_path, backing_passphrase=PW) == expect
    qemu_check_luks(top, PW, backing_passphrase=PW)


def test_wrong_and_missing_passphrase(tmp_path):
    path = tmp_path / "p.qcow2"
    qcow2fast.create(path, MiB, encrypt={"format": "luks", "key_secret": PW,
                                         "iter_time": ITER_TIME})
    with qcow2fast.open(path, "r+", key_secret=PW) as img:
        img.write(0, b"x" * 512)
    before = path.read_bytes()
    with pytest.raises(BadPassphraseError, match="Invalid password, cannot unlock any keyslot"):
        qcow2fast.open(path, "r+", key_secret="wrong")
    with pytest.raises(qcow2fast.InvalidArgumentError,
                       match="Parameter 'encrypt.key-secret' is required for cipher"):
        qcow2fast.open(path, "r+")
    with qcow2fast.open(path, no_io=True) as img:         # metadata only, as qemu-img info
        assert img.encryption.info()["format"] == "luks"
        with pytest.raises(qcow2fast.InvalidArgumentError, match="key-secret"):
            img.read(0, 512)
    assert path.read_bytes() == before


def test_secret_never_shown(tmp_path):
    path = tmp_path / "s.qcow2"
    secret = "Sw0rdfish-NEVER-SHOWN"
    qcow2fast.create(path, MiB, encrypt={"format": "luks", "key_secret": secret,
                                         "iter_time": ITER_TIME})
    import traceback
    for pw in ("x" + secret, None):
        try:
            qcow2fast.open(path, key_secret=pw)
        except qcow2fast.Qcow2Error as e:
            text = "".join(traceback.format_exception(e)) + repr(e)
            assert secret not in text
        else:
            raise AssertionError("opened with a wrong or missing passphrase")
    with qcow2fast.open(path, key_secret=secret) as img:
        shown = repr(img) + repr(img.key_secret) + str(img.key_secret) + repr(img.encryption) \
            + repr(vars(img)) + repr(img.encryption.cipher)
        assert secret not in shown


def test_info_matches_qemu(tmp_path):
    path = tmp_path / "i.qcow2"
    qcow2fast.create(path, MiB, encrypt={"format": "luks", "key_secret": PW,
                                         "iter_time": ITER_TIME, "cipher_mode": "cbc",
                                         "ivgen_alg": "essiv"})
    q = qemu_info(path)
    with qcow2fast.open(path, no_io=True) as img:
        from qcow2fast.cli.info_cmd import image_info
        ours = image_info(img, str(path))
    for key in ("encrypted", "format-specific"):
        assert ours[key] == q[key]
    assert qemu_img("info", str(path)).returncode == 0
