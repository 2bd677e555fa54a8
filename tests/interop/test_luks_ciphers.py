"""The LUKS ciphers OpenSSL's libcrypto lacks and qemu 7.2 takes from nettle
(Serpent, Twofish, CAST5, AES-192 in XTS), both ways against qemu-img:
images qemu makes read bit-exactly and written over, images qcow2fast
makes read by qemu, check clean; qemu's refusals where it refuses (XTS
over CAST5's 8-byte blocks; 192-bit keys outside XTS, on which qemu 7.2
aborts)."""

import pytest

import qcow2fast
from tests.helpers.luks_util import (ITER_TIME, luks_options, obj, qemu_check_luks,
                                     qemu_create_luks, qemu_img_create_luks, qemu_io_luks,
                                     qemu_raw_luks, write_pattern)

MiB = 1 << 20
PW = "s3rpent & tw0fish"

# (cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg)
CIPHERS = [
    ("serpent-256", "xts", "plain64", None),
    ("serpent-128", "cbc", "essiv", "sha256"),
    ("serpent-192", "xts", "plain", None),
    ("twofish-256", "xts", "plain64", None),
    ("twofish-128", "ctr", "plain64", None),
    ("twofish-192", "xts", "essiv", "sha256"),
    ("cast5-128", "cbc", "plain64", None),
    ("cast5-128", "ecb", "plain64", None),
    ("aes-192", "xts", "plain64", None),
]
# Made by qcow2fast only (qemu-img create spends a second or more each).
OURS_ONLY = [
    ("cast5-128", "cbc", "essiv", "md5"),
    ("cast5-128", "ctr", "plain", None),
    ("twofish-128", "ecb", "plain64", None),
    ("serpent-256", "ctr", "plain64", None),
]


def cid(c):
    return "-".join(x for x in c if x)


def enc_kw(c):
    alg, mode, ivgen, ivhash = c
    kw = {"cipher_alg": alg, "cipher_mode": mode, "ivgen_alg": ivgen}
    if ivhash:
        kw["ivgen_hash_alg"] = ivhash
    return kw


@pytest.mark.parametrize("cipher", CIPHERS, ids=cid)
def test_qemu_made(tmp_path, cipher):
    """qemu creates and writes; qcow2fast reads it exactly, writes over it;
    qemu reads that back and checks it."""
    path = tmp_path / "q.qcow2"
    qemu_create_luks(path, 4 * MiB, PW, **enc_kw(cipher))
    qemu_io_luks(path, PW, "write -P 0x5a 0 100k", "write -P 0xc3 3000k 5k")
    expect = bytearray(4 * MiB)
    expect[:100 * 1024] = b"\x5a" * (100 * 1024)
    expect[3000 * 1024:3005 * 1024] = b"\xc3" * 5120
    with qcow2fast.open(path, "r+", key_secret=PW) as img:
        assert img.read(0, img.size) == expect
        info = img.encryption.info()
        assert (info["cipher-alg"], info["cipher-mode"], info["ivgen-alg"]) == cipher[:3]
        write_pattern(img.write, expect, 5)
    assert qemu_raw_luks(path, PW, tmp_path) == expect
    qemu_check_luks(path, PW)


@pytest.mark.parametrize("cipher", CIPHERS + OURS_ONLY, ids=cid)
def test_qemu_reads_ours(tmp_path, cipher):
    path = tmp_path / "o.qcow2"
    qcow2fast.create(path, 4 * MiB, encrypt={"format": "luks", "key_secret": PW,
                                             "iter_time": ITER_TIME, **enc_kw(cipher)})
    expect = bytearray(4 * MiB)
    with qcow2fast.open(path, "r+", key_secret=PW) as img:
        write_pattern(img.write, expect, 9)
    assert qemu_raw_luks(path, PW, tmp_path) == expect
    qemu_check_luks(path, PW)
    qemu_io_luks(path, PW, "write -P 0x11 1M 64k")       # qemu writes, we read
    expect[MiB:MiB + 65536] = b"\x11" * 65536
    with qcow2fast.open(path, key_secret=PW) as img:
        assert img.read(0, img.size) == expect


@pytest.mark.parametrize("alg,mode", [("cast5-128", "xts"), ("serpent-192", "cbc"),
                                      ("twofish-192", "ecb")])
def test_refused_as_qemu(tmp_path, alg, mode):
    """XTS needs 16-byte blocks (qemu's message); a 192-bit key outside XTS
    gives key material qemu 7.2 aborts on: neither is made."""
    path = tmp_path / "r.qcow2"
    with pytest.raises(qcow2fast.UnsupportedFeatureError) as e:
        qcow2fast.create(path, MiB, encrypt={"format": "luks", "key_secret": PW,
                                             "iter_time": ITER_TIME, "cipher_alg": alg,
                                             "cipher_mode": mode})
    assert not path.exists()
    if mode == "xts":
        p = qemu_img_create_luks("-q", "-f", "qcow2", *obj(PW), "-o",
                                 luks_options(cipher_alg=alg, cipher_mode=mode),
                                 str(tmp_path / "q.qcow2"), "1M")
        assert p.returncode != 0
        assert str(e.value) in p.stderr_text

