"""Image locks compatible with qemu's (host/lock.py), both directions:
qemu-io / qemu-nbd hold an image while qcow2fast tries it, and qcow2fast
holds one while qemu-img / qemu-io try it.  The lock bytes qcow2fast takes
are compared with the ones qemu takes for the same open (/proc/locks)."""

import contextlib
import os
import shutil
import subprocess
import time

import pytest

import qcow2fast
from qcow2fast import ImageLockedError, InvalidArgumentError
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import QEMU_IO, qemu_create, qemu_img, qemu_io, require_qemu

pytestmark = pytest.mark.qemu

SHARED_WRITE = 'Failed to get shared "write" lock'
WRITE = 'Failed to get "write" lock'


def lock_bytes(path):
    """The byte ranges locked on ``path``'s inode (from /proc/locks), sorted."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = []
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts:               # a waiter, not a holder
                continue
            if parts[-3] == dev:
                out.append((parts[1], parts[3], int(parts[-2]), int(parts[-1])))
    return sorted(out)


def wait_locked(path, proc):
    """Until ``proc`` (which opens ``path``) holds its locks."""
    deadline = time.monotonic() + 60
    while not lock_bytes(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the holder never locked the image"
        time.sleep(0.02)


@contextlib.contextmanager
def held(*argv, path):
    """Run a qemu program that keeps ``path`` open until it is stopped."""
    require_qemu()
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_locked(path, proc)
        yield proc
    finally:
        proc.kill()                 # (qemu-nbd under load was slow to honour SIGTERM)
        proc.communicate(timeout=60)


def qemu_io_holding(path, *flags, fmt="qcow2"):
    return held(QEMU_IO, "-f", fmt, *flags, "-c", "sleep 600000", path, path=path)


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "a.qcow2")
    qemu_create(path, 4 << 20)
    qemu_io(path, "write -P 0x5a 0 64k")
    return path


def qemu_locks_for(path, *flags, fmt="qcow2"):
    with qemu_io_holding(path, *flags, fmt=fmt):
        return lock_bytes(path)


@pytest.mark.parametrize("mode,qemu_flags,kw", [
    ("r", ["-r"], {}),
    ("r+", [], {}),
    ("r", ["-r", "-U"], {"force_share": True}),
])
def test_same_lock_bytes_as_qemu(image, mode, qemu_flags, kw):
    expected = qemu_locks_for(image, *qemu_flags)
    assert expected, "qemu took no locks: /proc/locks unreadable?"
    with qcow2fast.open(image, mode, **kw):
        assert lock_bytes(image) == expected
    assert lock_bytes(image) == []         # closing releases them


def test_raw_and_backing_lock_bytes_as_qemu(tmp_path, image):
    raw = str(tmp_path / "b.raw")
    qemu_img("create", "-q", "-f", "raw", raw, "4M")
    top = str(tmp_path / "top.qcow2")
    qemu_create(top, None, backing=raw, backing_fmt="raw")
    top2 = str(tmp_path / "top2.qcow2")
    qemu_create(top2, None, backing=image, backing_fmt="qcow2")
    for held_top, backing in ((top, raw), (top2, image)):
        with held(QEMU_IO, "-c", "sleep 600000", held_top, path=held_top):
            expected = lock_bytes(backing)
        with qcow2fast.open(held_top, "r+"):
            assert lock_bytes(backing) == expected
    from qcow2fast.host.raw import RawImage
    for writable, flags in ((False, ["-r"]), (True, [])):
        expected = qemu_locks_for(raw, *flags, fmt="raw")
        img = RawImage(raw, writable=writable)
        try:
            assert lock_bytes(raw) == expected
        finally:
            img.close()


def test_qemu_writer_keeps_qcow2fast_out(image, capsys):
    with qemu_io_holding(image):
        for mode, message in (("r", SHARED_WRITE), ("r+", WRITE)):
            with pytest.raises(ImageLockedError) as e:
                qcow2fast.open(image, mode)
            assert str(e.value) == (f"Could not open '{image}': {message}\n"
                                    f"Is another process using the image [{image}]?")
        with qcow2fast.open(image, "r", force_share=True) as img:     # -U reads anyway
            assert img.read(0, 4) == b"\x5a" * 4
        with pytest.raises(InvalidArgumentError, match="force-share=on can only be used "
                                                       "with read-only images"):
            qcow2fast.open(image, "r+", force_share=True)
        # The command line: the qemu-img subcommands that take -U.
        for argv in (["info"], ["check"], ["map"], ["compare", image],
                     ["convert", "-O", "raw"], ["dd", f"of={image}.dd"], ["snapshot", "-l"]):
            tail = [f"if={image}"] if argv[0] == "dd" else [image]
            if argv[0] == "convert":
                tail.append(os.path.join(os.path.dirname(image), "out.raw"))
            status, out, err = run_cli(capsys, *argv, *tail)
            assert status in (1, 2) and SHARED_WRITE in err, (argv, status, err)
            status, out, err = run_cli(capsys, argv[0], "-U", *argv[1:], *tail)
            assert status == 0, (argv, err)
        status, out, err = run_cli(capsys, "check", "-U", "-r", "all", image)
        assert status == 1 and "force-share=on can only be used with read-only" in err
        status, out, err = run_cli(capsys, "info", "--image-opts",
                                   f"driver=qcow2,file.filename={image},file.locking=off")
        assert status == 0, err
        # An overlay over an image a VM writes (qemu-iotests 153): create reads
        # the backing file's size sharing it, as qemu-img does.
        overlay = os.path.join(os.path.dirname(image), "overlay.qcow2")
        status, out, err = run_cli(capsys, "create", "-q", "-f", "qcow2", "-b", image, "-F",
                                   "qcow2", overlay)
        assert status == 0, err
        with qcow2fast.open(image, force_share=True) as img, \
                qcow2fast.open(overlay, force_share=True) as top:
            assert top.size == img.size and top.header.backing_file == image


def test_qemu_reader_allows_readers_only(image):
    with qemu_io_holding(image, "-r"):
        with qcow2fast.open(image) as img:
            assert img.read(0, 1) == b"\x5a"
        with pytest.raises(ImageLockedError, match=WRITE):
            qcow2fast.open(image, "r+")


def test_qemu_nbd_holds_the_image(tmp_path, image):
    require_qemu()
    sock = str(tmp_path / "q.sock")
    with held(shutil.which("qemu-nbd"), "-t", "-f", "qcow2", "-k", sock, image, path=image):
        with pytest.raises(ImageLockedError, match=SHARED_WRITE):
            qcow2fast.open(image)
        with qcow2fast.open(image, force_share=True) as img:
            assert img.read(0, 1) == b"\x5a"


def test_qcow2fast_writer_keeps_qemu_out(image, tmp_path):
    with qcow2fast.open(image, "r+") as img:
        p = qemu_img("info", image, check=False)
        assert p.returncode == 1 and SHARED_WRITE in p.stderr_text
        assert qemu_img("info", "-U", image).returncode == 0
        p = qemu_io(image, "read 0 1", extra=["-r"], check=False)
        assert p.returncode == 1 and SHARED_WRITE in p.stderr_text
        p = qemu_io(image, "write 0 1", check=False)
        assert p.returncode == 1 and WRITE in p.stderr_text
        # Neither qemu-img create nor qcow2fast create truncates it.
        p = qemu_img("create", "-f", "qcow2", image, "1M", check=False)
        assert p.returncode == 1 and WRITE in p.stderr_text
        with pytest.raises(ImageLockedError, match=WRITE):
            qcow2fast.create(image, 1 << 20)
        with pytest.raises(ImageLockedError, match=WRITE):
            qcow2fast.convert(image, image, format="raw", force_share=True)
        # Another opener in this process is another open file description.
        with pytest.raises(ImageLockedError, match=SHARED_WRITE):
            qcow2fast.open(image)
        img.write(0, b"x")
    assert img.closed
    qemu_io(image, "read -P 0x78 0 1")          # released on close


def test_qcow2fast_reader_and_backing(tmp_path, image):
    top = str(tmp_path / "top.qcow2")
    qemu_create(top, None, backing=image, backing_fmt="qcow2")
    with qcow2fast.open(top, "r+"):
        p = qemu_io(image, "write 0 1", check=False)    # the backing file is read-locked
        assert p.returncode == 1 and WRITE in p.stderr_text
        qemu_io(image, "read -P 0x5a 0 1", extra=["-r"])
        with qcow2fast.open(image) as low:               # readers share it
            assert low.read(0, 1) == b"\x5a"
    with qemu_io_holding(image):
        with pytest.raises(ImageLockedError) as e:
            qcow2fast.open(top)
        assert str(e.value).startswith(f"Could not open '{top}': Could not open backing "
                                       f"file: {SHARED_WRITE}")
        with qcow2fast.open(top, force_share=True) as img:
            assert img.read(0, 1) == b"\x5a"


def test_locking_off(image):
    with qemu_io_holding(image):
        with qcow2fast.open(image, locking=False) as img:
            assert img.read(0, 1) == b"\x5a"
