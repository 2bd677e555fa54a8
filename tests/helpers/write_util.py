"""Helpers of the write interop tests: sizes, creating, running a random
scenario against the model, and the end-of-scenario oracle."""

import qcow2fast
from .model import ModelImage
from .qemu_util import MiB, assert_qemu_content, qemu_check, qemu_create, qemu_img, qemu_raw


def image_size(cs):
    return max(2 * MiB, 10 * cs)


def qf_create(path, size, **kw):
    qcow2fast.create(str(path), size, **kw)
    return str(path)


def finish(path, model_bytes, *, check_leaks=True):
    """The end-of-scenario oracle: qemu check is clean, qemu reads the model."""
    qemu_check(path, expect_clean=check_leaks)
    assert_qemu_content(path, model_bytes)


def scenario(path, rng, *, ops=40, initial=None, backing=None, reopen=True, **open_kw):
    """Random ops in a r+ session (then a second session), return the model bytes."""
    with qcow2fast.open(path, "r+", **open_kw) as img:
        assert not img.read_only
        m = ModelImage(img, initial, backing)
        m.check_all()
        m.random_ops(rng, ops)
        m.check_all()
        data = bytes(m.data)
    if reopen:
        with qcow2fast.open(path, "r+", **open_kw) as img:
            m = ModelImage(img, data, backing)
            m.check_all()
            m.random_ops(rng, ops // 2)
            m.check_all()
            data = bytes(m.data)
    return data


def random_session(path, initial, rng, ops, **open_kw):
    """One r+ session: the image must read as ``initial``, then ``ops``
    random operations checked against the model; returns the content."""
    with qcow2fast.open(path, "r+", **open_kw) as img:
        m = ModelImage(img, initial)
        m.check_all()
        m.random_ops(rng, ops)
        return bytes(m.data)


def make_backing(tmp_path, kind, size, rng, cs=65536, compat="1.1"):
    """A backing file with random content (and holes); returns (path, fmt, content)."""
    content = bytearray(size)
    for i in range(0, size, size // 7):
        n = min(size - i, size // 10)
        content[i:i + n] = rng.randbytes(n)
    if kind == "raw":
        p = tmp_path / "base.raw"
        p.write_bytes(bytes(content))
        return str(p), "raw", bytes(content)
    p = str(tmp_path / f"base-{kind}.qcow2")
    if kind == "qemu":
        qemu_create(p, size, cluster_size=cs, compat=compat)
        src = tmp_path / "base-src.raw"
        src.write_bytes(bytes(content))
        qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(src), p)
    else:
        qf_create(p, size, cluster_size=cs, compat=compat)
        with qcow2fast.open(p, "r+") as img:
            for i in range(0, size, size // 7):
                n = min(size - i, size // 10)
                img.write(i, bytes(content[i:i + n]))
    assert qemu_raw(p) == bytes(content)
    return p, "qcow2", bytes(content)
