"""The dirty bit and repair: images qcow2fast leaves behind when its process
dies (lazy refcounts, at every cluster size and refcount width) and dirty
images qemu leaves must satisfy qemu after qcow2fast opens them.

A process that dies leaves the page cache behind; what a power loss can
leave (every state between two barriers) is tested in tests/crash/.
"""

import pickle

import pytest

import qcow2fast
from tests.helpers.model import ModelImage
from tests.helpers.qemu_util import (MiB, Rng, assert_qemu_content, file_state, header, is_dirty,
                                     patch, qemu_check, qemu_create, qemu_img, qemu_info, qemu_io,
                                     qemu_raw, run_python)
from tests.helpers.write_util import finish, image_size, qf_create, random_session

pytestmark = pytest.mark.qemu


def crash_after_flush(tmp_path, path, rng, size, count=30, flush=True, **open_kw):
    """Write in a child that flushes (unless flush=False) and then dies with
    os._exit, without closing; return the expected content."""
    expected = bytearray(qemu_raw(path))
    ops = []
    for _ in range(count):
        off, n = rng.span(size, 200000)
        if rng.random() < 0.8:
            b = rng.randbytes(n)
            ops.append(("write", off, b))
            expected[off:off + n] = b
        else:
            ops.append(("zero", off, n))
            expected[off:off + n] = bytes(n)
    opsfile = tmp_path / "ops.pickle"
    with open(opsfile, "wb") as f:
        pickle.dump(ops, f)
    run_python(CRASH_CHILD.format(ops=str(opsfile), path=str(path), flush=flush,
                                  open_kw=open_kw))
    return bytes(expected)


@pytest.mark.parametrize("cs,rb", [(512, 1), (4096, 16), (65536, 64), (2 * MiB, 8)])
def test_lazy_refcounts_clean_close(tmp_path, cs, rb):
    rng = Rng(f"lazyclean-{cs}-{rb}")
    size = image_size(cs)
    path = qf_create(tmp_path / "l.qcow2", size, cluster_size=cs, refcount_bits=rb,
                     lazy_refcounts=True)
    with qcow2fast.open(path, "r+") as img:
        assert img.lazy_refcounts
        m = ModelImage(img)
        m.random_ops(rng, 30)
        data = bytes(m.data)
    assert not is_dirty(path), "clean close must clear the dirty bit"
    finish(path, data)
    assert qemu_info(path)["format-specific"]["data"]["lazy-refcounts"] is True


CRASH_CHILD = """
import os, pickle, qcow2fast
ops = pickle.load(open({ops!r}, "rb"))
img = qcow2fast.open({path!r}, "r+", **{open_kw!r})
for op, off, arg in ops:
    if op == "write":
        img.write(off, arg)
    else:
        img.write_zeroes(off, arg, may_unmap=True)
if {flush!r}:
    img.flush()
os._exit(0)
"""


@pytest.mark.parametrize("cs,rb", [(512, 16), (4096, 1), (65536, 64), (2 * MiB, 16)])
def test_lazy_refcounts_left_dirty_then_repaired(tmp_path, cs, rb):
    rng = Rng(f"lazydirty-{cs}-{rb}")
    size = image_size(cs)
    path = qf_create(tmp_path / "l.qcow2", size, cluster_size=cs, refcount_bits=rb,
                     lazy_refcounts=True)
    expected = crash_after_flush(tmp_path, path, rng, size)
    # After a flush the data and mappings are on disk whatever the refcounts.
    assert_qemu_content(path, expected)
    # Either the image says its refcounts may be stale, or they are not.
    if not is_dirty(path):
        qemu_check(path)

    # A read-only open neither repairs nor clears the bit.
    before = file_state(path)
    with qcow2fast.open(path) as img:
        assert img.read(0, size) == expected
    assert file_state(path) == before

    data = random_session(path, expected, rng, 20)
    assert not is_dirty(path)
    finish(path, data)


@pytest.mark.parametrize("cs,rb", [(4096, 16), (65536, 8), (512, 64)])
def test_qemu_dirty_image_with_snapshot_and_compressed_repaired(tmp_path, cs, rb):
    """qemu (lazy refcounts) killed after writes over a snapshot and compressed
    writes: qcow2fast must rebuild refcounts that count snapshot references and
    packed compressed clusters, then write safely."""
    rng = Rng(f"qdirty-{cs}-{rb}")
    size = image_size(cs)
    path = qemu_create(tmp_path / "d.qcow2", size, cluster_size=cs, refcount_bits=rb,
                       lazy_refcounts="on")
    qemu_io(path, f"write -q -P 0x11 0 {4 * cs}", f"write -q -c -P 0x12 {6 * cs} {cs}",
            f"write -q -c -P 0x13 {7 * cs} {cs}", f"write -q -P 0x14 {size // 2} {cs}")
    qemu_img("snapshot", "-c", "s1", path)
    snap = qemu_raw(path, snapshot="s1")
    p = qemu_io(path, f"write -q -P 0x21 {cs + 5} 100", f"write -q -c -P 0x22 {9 * cs} {cs}",
                f"write -q -c -P 0x23 {10 * cs} {cs}", f"write -q -P 0x24 {size // 2} {3 * cs}",
                f"write -q -z -u {2 * cs} {cs}", f"write -q -P 0x25 {7 * cs + 3} 10",
                "flush", "sigraise 9", check=False)
    assert p.returncode in (-9, 137), p.stderr_text
    assert is_dirty(path)
    expected = qemu_raw(path)
    data = random_session(path, expected, rng, 25)
    assert not is_dirty(path)
    finish(path, data)
    assert_qemu_content(path, snap, snapshot="s1")
    qemu_img("snapshot", "-d", "s1", path)
    finish(path, data)


def test_dirty_bit_on_non_lazy_image_is_repaired(tmp_path):
    """A dirty bit set on an image without lazy refcounts (refcounts actually
    fine): r+ must still treat it as dirty, repair, and clear the bit."""
    path = qemu_create(tmp_path / "d.qcow2", 2 * MiB, cluster_size=4096)
    qemu_io(path, "write -q -P 0x51 0 100000", "write -q -c -P 0x52 1M 4096")
    expected = qemu_raw(path)
    h = header(path)
    patch(path, 72, ">Q", h["incompatible_features"] | 1)
    with qcow2fast.open(path) as img:
        assert img.dirty
        assert "dirty bit" in img.features["incompatible"]
        assert img.read(0, img.size) == expected
    with qcow2fast.open(path, "r+") as img:
        m = ModelImage(img, expected)
        m.write(5000, b"q" * 70000)
        data = bytes(m.data)
    assert not is_dirty(path)
    finish(path, data)


def test_dirty_backing_file_is_not_repaired(tmp_path):
    """A dirty (lazy-refcount, killed) image used as a backing file is opened
    read-only: it must not be repaired (written) when the overlay is written."""
    base = qemu_create(tmp_path / "base.qcow2", 2 * MiB, cluster_size=4096,
                       lazy_refcounts="on")
    p = qemu_io(base, "write -q -P 0x61 0 1M", "flush", "sigraise 9", check=False)
    assert p.returncode in (-9, 137)
    assert is_dirty(base)
    top = qf_create(tmp_path / "top.qcow2", 2 * MiB, cluster_size=65536,
                    backing_file=str(base), backing_format="qcow2", lazy_refcounts=True)
    before = file_state(base)
    expected = bytearray(b"\x61" * MiB + bytes(MiB))
    with qcow2fast.open(top, "r+") as img:
        assert img.backing.dirty and img.backing.read_only
        img.write(1000, b"t" * 100000)
        expected[1000:101000] = b"t" * 100000
        assert img.read(0, img.size) == expected
    assert file_state(base) == before, "the backing file was modified"
    qemu_check(top)
    assert_qemu_content(top, bytes(expected))
    assert qemu_info(top)["backing-filename"] == str(base)
