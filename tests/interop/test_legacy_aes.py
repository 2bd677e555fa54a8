"""qemu's legacy AES-CBC qcow2 encryption (encrypt.format=aes, crypt_method
1), both ways against qemu-img/qemu-io 7.2, which create, read and write it
(only qemu's system emulators refuse it): images qemu makes read
bit-exactly, images qcow2fast makes and writes read by qemu, check clean,
compare equal; cluster sizes 4 KiB to 2 MiB, extended L2, a data file (with
LUKS too), a chain, convert into it and out of it.  Its IVs come from the
*guest* offset, so one test decrypts qemu's sectors here with the openssl
command (a reference outside qcow2fast's cipher path)."""

import subprocess

import pytest

import qcow2fast
from tests.helpers.cli_util import run_cli
from tests.helpers.luks_util import (obj, opts, qemu_check_luks, qemu_compare_luks,
                                     qemu_create_luks, qemu_io_luks, qemu_raw_luks,
                                     write_pattern)
from tests.helpers.qemu_util import qemu_img, qemu_info

MiB = 1 << 20
PW = "correct horse battery staple"     # longer than 16 bytes: qemu keeps the first 16


def qemu_create_aes(path, size, passphrase=PW, extra=()):
    qemu_img("create", "-q", "-f", "qcow2", *obj(passphrase), "-o",
             "encrypt.format=aes,encrypt.key-secret=sec0", *extra, str(path), str(size))


def ours_create_aes(path, size, passphrase=PW, **kw):
    qcow2fast.create(path, size, encrypt={"format": "aes", "key_secret": passphrase}, **kw)


def openssl_decrypt_sector(ciphertext, key, sector):
    """AES-128-CBC of one 512-byte sector, IV plain64(sector), by the openssl command."""
    iv = sector.to_bytes(8, "little") + bytes(8)
    p = subprocess.run(["openssl", "enc", "-d", "-aes-128-cbc", "-nopad", "-K", key.hex(),
                        "-iv", iv.hex()], input=ciphertext, capture_output=True, check=True)
    return p.stdout


def test_qemu_image_on_disk_format(tmp_path):
    """qemu's sectors decrypt, outside qcow2fast, with the passphrase's first
    16 bytes as key and the guest sector number as IV; qcow2fast reads the
    same and writes sectors that decrypt the same way."""
    path = tmp_path / "q.qcow2"
    qemu_create_aes(path, 4 * MiB)
    qemu_io_luks(path, PW, "write -P 0x5a 3M 1k")
    key = PW.encode()[:16]
    with qcow2fast.open(path, "r+", key_secret=PW) as img:
        host = next(e.host_offset for e in img.block_status() if e.kind == "data")
        assert host != 3 * MiB          # the IV below is the guest's, not the host's
        assert img.read(3 * MiB, 1024) == b"\x5a" * 1024
        img.write(3 * MiB + 512, b"\x99" * 512)
    raw = path.read_bytes()
    assert openssl_decrypt_sector(raw[host:host + 512], key, 3 * MiB // 512) == b"\x5a" * 512
    assert openssl_decrypt_sector(raw[host + 512:host + 1024], key,
                                  3 * MiB // 512 + 1) == b"\x99" * 512
    qemu_io_luks(path, PW, "read -P 0x5a 3M 512", f"read -P 0x99 {3 * MiB + 512} 512")


@pytest.mark.parametrize("cluster_size,extended_l2", [(4096, False), (65536, True),
                                                      (2 * MiB, False)])
@pytest.mark.parametrize("maker", ["qemu", "ours"])
def test_both_ways(tmp_path, cluster_size, extended_l2, maker):
    """One side creates, qemu writes, qcow2fast reads it and writes over it,
    qemu reads the result, checks it and compares it with the raw content."""
    path = tmp_path / "a.qcow2"
    size = 6 * MiB
    if maker == "qemu":
        qemu_create_aes(path, size, extra=["-o", f"cluster_size={cluster_size},extended_l2="
                                                 f"{'on' if extended_l2 else 'off'}"])
    else:
        ours_create_aes(path, size, cluster_size=cluster_size, extended_l2=extended_l2)
    q = qemu_info(path)
    assert q["encrypted"] and q["format-specific"]["data"]["encrypt"] == {"format": "aes"}
    qemu_io_luks(path, PW, "write -P 0x77 1M 2M")
    expect = bytearray(size)
    expect[MiB:3 * MiB] = b"\x77" * (2 * MiB)
    with qcow2fast.open(path, "r+", key_secret=PW) as img:
        assert img.read(0, size) == expect
        write_pattern(img.write, expect, cluster_size)
        img.write_zeroes(4 * MiB, 65536)
        expect[4 * MiB:4 * MiB + 65536] = bytes(65536)
        assert img.read(0, size) == expect
    want = bytes(expect)
    assert qemu_raw_luks(path, PW, tmp_path) == want
    qemu_check_luks(path, PW)
    ref = tmp_path / "want.raw"
    ref.write_bytes(want)
    qemu_compare_luks(path, PW, ref)


@pytest.mark.parametrize("maker", ["qemu", "ours"])
@pytest.mark.parametrize("fmt", ["aes", "luks"])
def test_with_data_file(tmp_path, maker, fmt):
    """AES or LUKS data in an external data file (qemu allows both pairs):
    the IVs come from the guest offset (AES) or the data file's offset
    (LUKS), which are equal there."""
    path, data = tmp_path / "d.qcow2", tmp_path / "d.data"
    extra = ["-o", f"data_file={data}"]
    if maker == "qemu" and fmt == "aes":
        qemu_create_aes(path, 4 * MiB, extra=extra)
    elif maker == "qemu":
        qemu_create_luks(path, 4 * MiB, PW, extra=extra)
    else:
        enc = {"format": fmt, "key_secret": PW, **({"iter_time": 10} if fmt == "luks" else {})}
        qcow2fast.create(path, 4 * MiB, data_file=str(data), encrypt=enc)
    qemu_io_luks(path, PW, "write -P 0x31 0 1M")
    expect = bytearray(b"\x31" * MiB + bytes(3 * MiB))
    with qcow2fast.open(path, "r+", key_secret=PW) as img:
        assert img.read(0, img.size) == expect
        write_pattern(img.write, expect, 7)
    assert qemu_raw_luks(path, PW, tmp_path) == expect
    qemu_check_luks(path, PW)
    assert b"\x31" * 512 not in data.read_bytes()       # (encrypted there)


def test_chain_of_aes_layers(tmp_path):
    """An AES base under an AES top with another passphrase: each layer
    takes its own (a passphrase given for the whole chain does not open a
    legacy AES layer below the top: a wrong one would read garbage)."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_create_aes(base, 2 * MiB, "base pass")
    qemu_io_luks(base, "base pass", "write -P 0x42 0 2M")
    ours_create_aes(top, None, backing_file=str(base), backing_format="qcow2")
    with pytest.raises(qcow2fast.InvalidArgumentError, match="key-secret. is required"):
        qcow2fast.open(top, key_secret=PW)
    with qcow2fast.open(top, "r+", key_secret={0: PW, 1: "base pass"}) as img:
        img.write(4096 + 100, b"\x99" * 700)
        got = img.read(0, img.size)
    expect = bytearray(b"\x42" * 2 * MiB)
    expect[4196:4896] = b"\x99" * 700
    assert got == expect
    assert qemu_raw_luks(top, PW, tmp_path, backing_passphrase="base pass") == expect
    qemu_check_luks(top, PW, backing_passphrase="base pass")


def test_cli_create_and_convert_out(capsys, tmp_path):
    """create's line as qemu-img's; convert out of AES to raw and to a
    plain qcow2; convert into AES."""
    ours, theirs = tmp_path / "o.qcow2", tmp_path / "t.qcow2"
    o = "encrypt.format=aes,encrypt.key-secret=sec0"
    status, out, _ = run_cli(capsys, "create", "-f", "qcow2", *obj(PW), "-o", o, ours, "1M")
    assert status == 0
    ref = qemu_img("create", "-f", "qcow2", *obj(PW), "-o", o, str(theirs), "1M").stdout_text
    assert out == ref.replace(str(theirs), str(ours))
    qemu_io_luks(theirs, PW, "write -P 0x21 0 300k", "write -P 0x22 900k 100k")
    back = tmp_path / "back.raw"
    status, _, err = run_cli(capsys, "convert", *obj(PW), "-O", "raw", "--image-opts",
                             opts(theirs), back)
    assert status == 0, err
    assert back.read_bytes() == qemu_raw_luks(theirs, PW, tmp_path)
    plain = tmp_path / "plain.qcow2"
    status, _, err = run_cli(capsys, "convert", *obj(PW), "-O", "qcow2", "--image-opts",
                             opts(theirs), plain)
    assert status == 0, err
    qemu_img("compare", "-f", "qcow2", "-F", "raw", str(plain), str(back))
    enc = tmp_path / "enc.qcow2"
    status, _, err = run_cli(capsys, "convert", *obj(PW), "-O", "qcow2", "-o", o, back, enc)
    assert status == 0, err
    qemu_compare_luks(enc, PW, back)
    qemu_check_luks(enc, PW)


@pytest.mark.parametrize("case", ["missing", "luks-option", "not-utf8", "nul"])
def test_errors_as_qemu(capsys, tmp_path, case):
    """A missing secret, a LUKS-only option, a secret that is not UTF-8 or
    holds a NUL: qemu's messages, nothing written."""
    path = tmp_path / "e.qcow2"
    qemu_create_aes(path, MiB)
    before = path.read_bytes()
    if case == "missing":
        args = ["check", str(path)]
    elif case == "luks-option":
        args = ["create", "-f", "qcow2", *obj(PW), "-o",
                "encrypt.format=aes,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-256",
                str(tmp_path / "n.qcow2"), "1M"]
    else:
        data = "/w==" if case == "not-utf8" else "YWJjAGRlZg=="     # b"\xff", b"abc\0def"
        args = ["check", "--object", f"secret,id=sec0,data={data},format=base64",
                "--image-opts", opts(path)]
    p = qemu_img(*args, check=False)
    status, _, err = run_cli(capsys, *args)
    assert status != 0 and p.returncode != 0
    theirs = p.stderr_text.strip().removeprefix("qemu-img: ")
    ours = err.strip().removeprefix("qcow2fast: ")
    assert ours == theirs.replace("secret sec0", "secret")
    assert path.read_bytes() == before
    assert not (tmp_path / "n.qcow2").exists()


def test_info_as_qemu(capsys, tmp_path):
    path = tmp_path / "i.qcow2"
    ours_create_aes(path, MiB)
    for fmt in ("human", "json"):
        status, out, _ = run_cli(capsys, "info", f"--output={fmt}", path)
        assert status == 0
        assert out == qemu_img("info", f"--output={fmt}", str(path)).stdout_text


@pytest.mark.parametrize("fmt", ["aes", "luks"])
def test_convert_into_encrypted_on_threads(tmp_path, fmt):
    """Convert into an encrypted image: batches written by the writer thread
    beside the readers, in order; zero runs, a size that is not whole
    sectors (the tail of the last one reads as zeros, as in qemu)."""
    import numpy as np
    from qcow2fast.ops.convert import convert
    rng = np.random.default_rng(4)
    data = bytearray(rng.integers(0, 256, 9 * MiB + 1234, dtype=np.uint8).tobytes())
    data[2 * MiB:5 * MiB] = bytes(3 * MiB)
    src, dst = tmp_path / "src.raw", tmp_path / "dst.qcow2"
    src.write_bytes(data)
    enc = {"format": fmt, "key_secret": PW}
    if fmt == "luks":
        enc["iter_time"] = 10
    convert([str(src)], str(dst), format="qcow2", options={"encrypt": enc}, threads=4)
    want = bytes(data) + bytes(-len(data) % 512)
    assert qemu_raw_luks(dst, PW, tmp_path) == want
    qemu_check_luks(dst, PW)
    with qcow2fast.open(dst, key_secret=PW) as img:
        assert img.read(0, img.size) == want
