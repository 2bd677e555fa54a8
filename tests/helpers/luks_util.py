"""LUKS-encrypted images with qemu-img as the oracle: a secret object,
--image-opts strings, creation (retried: qemu 7.2 sometimes fails to time
PBKDF2, "Unable to get accurate CPU usage"), content and check."""

import numpy as np

from .qemu_util import QEMU_IO, qemu_img, require_qemu, run

SECRET_ID = "sec0"
ITER_TIME = 10          # ms of PBKDF2: fast tests


def obj(passphrase, oid=SECRET_ID):
    return ["--object", f"secret,id={oid},data={passphrase}"]


def opts(path, oid=SECRET_ID, driver="qcow2", backing_oid=None):
    s = f"driver={driver},file.filename={path}"
    if driver == "qcow2":
        s += f",encrypt.key-secret={oid}"
    if backing_oid:
        s += f",backing.encrypt.key-secret={backing_oid}"
    return s


def luks_options(oid=SECRET_ID, **enc):
    parts = ["encrypt.format=luks", f"encrypt.key-secret={oid}", f"encrypt.iter-time={ITER_TIME}"]
    parts += [f"encrypt.{k.replace('_', '-')}={v}" for k, v in enc.items()]
    return ",".join(parts)


def qemu_img_create_luks(*args):
    """``qemu-img create *args`` of a LUKS image (qemu_util.run repeats it
    while qemu fails to time PBKDF2); the CompletedProcess."""
    return qemu_img("create", *args, check=False)


def qemu_create_luks(path, size, passphrase, *, extra=(), **enc):
    """qemu-img create of a LUKS qcow2 image (``enc``: cipher_alg=..., ...)."""
    p = qemu_img_create_luks("-q", "-f", "qcow2", *obj(passphrase), "-o", luks_options(**enc),
                             *extra, str(path), str(size))
    if p.returncode != 0:
        raise AssertionError(f"qemu-img create failed: {p.stderr_text}")


def qemu_io_luks(path, passphrase, *cmds, backing_passphrase=None):
    require_qemu()
    args = [QEMU_IO, *obj(passphrase)]
    if backing_passphrase is not None:
        args += obj(backing_passphrase, "sec1")
    args += ["--image-opts", opts(path, backing_oid="sec1" if backing_passphrase else None)]
    for c in cmds:
        args += ["-c", c]
    p = run(args)
    out = p.stdout_text + p.stderr_text
    assert "failed" not in out and "error" not in out.lower(), out[-4000:]
    return p


def qemu_raw_luks(path, passphrase, tmp_path, backing_passphrase=None):
    """The guest content qemu reads (qemu-img convert -O raw)."""
    out = tmp_path / (path.name + ".qemu.raw")
    extra = obj(backing_passphrase, "sec1") if backing_passphrase is not None else []
    qemu_img("convert", *obj(passphrase), *extra, "-O", "raw", "--image-opts",
             opts(path, backing_oid="sec1" if backing_passphrase else None), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_check_luks(path, passphrase, backing_passphrase=None):
    """qemu-img check with the secret: clean or AssertionError."""
    extra = obj(backing_passphrase, "sec1") if backing_passphrase is not None else []
    p = qemu_img("check", *obj(passphrase), *extra, "--image-opts",
                 opts(path, backing_oid="sec1" if backing_passphrase else None), check=False)
    assert p.returncode == 0 and "No errors were found" in p.stdout_text, \
        p.stdout_text + p.stderr_text


def qemu_compare_luks(path, passphrase, raw_path):
    p = qemu_img("compare", *obj(passphrase), "--image-opts", opts(path),
                 opts(raw_path, driver="raw"), check=False)
    assert p.returncode == 0, p.stdout_text + p.stderr_text


def write_pattern(write, expect, seed):
    """Sector-unaligned writes across clusters, applied to ``expect`` too."""
    rng = np.random.default_rng(seed)
    size = len(expect)
    for off, n in ((0, 70000), (size // 2 - 777, 200000), (size - 1000, 1000), (12345, 3)):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        write(off, data)
        expect[off:off + n] = data
