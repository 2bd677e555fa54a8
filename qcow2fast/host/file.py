"""Host files that may be block devices (an LVM volume, a loop device...).

A block device has a fixed size: it cannot grow, and "truncating" it to a
size it already holds changes nothing (qemu's host_device driver does the
same).  It also starts with whatever it held: no range of it is known to
read as zeros, so a new image or a raw copy on it must zero what it does
not write.  Sizes come from ``lseek(SEEK_END)``, which is right for both
(``st_size`` of a block device is 0).
"""

import errno
import mmap
import os
import queue
import stat
import threading

from .._ext.fileio import File, punch_hole, pwrite_buffers, zero_range
from . import lock
from .remote import is_remote
from ..spec.constants import SECTOR

# Buffered write calls cover at most QF_WRITE_MAX (256 KiB, csrc/qf_io.h:
# every data write goes through C).  With larger buffered writes the
# kernel takes 2 MiB page-cache folios (ext4 and xfs, Linux 6.16+); in a VM
# that hands free memory back to its host (virtio-balloon free page
# reporting) those come from returned blocks and fault in from the host one
# page at a time.  Measured here: a 2.2 GB qcow2 -> raw conversion took
# 2.9-4.1 s with 2 MiB writes, 0.7-0.8 s with 256 KiB ones (docs/convert.md).

_ZEROS = memoryview(mmap.mmap(-1, 1 << 20))     # page aligned: fit for O_DIRECT
FIRST_BLOCK = 4096      # what qemu's allocate_first_block writes (a sector if the file is smaller)


def is_device(fd):
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def size(fd):
    return os.lseek(fd, 0, os.SEEK_END)


def set_size(fd, nbytes, name):
    """ftruncate a regular file; a block device must already hold ``nbytes``."""
    if not is_device(fd):
        os.ftruncate(fd, nbytes)
        return
    have = size(fd)
    if nbytes > have:
        raise OSError(errno.ENOSPC, f"a block device cannot grow: {nbytes} bytes are "
                      f"needed and the device has {have}", name)


def zero(fd, off, n, write):
    """Make [off, off+n) of ``fd`` read as zeros: deallocated (punch hole, as
    qemu's write-zeroes with unmap), else zeroed by the kernel (ZERO_RANGE,
    a device's write-zeroes), else written with zeros by ``write(data, off)``
    (page-aligned buffers: fit for an O_DIRECT writer)."""
    if n <= 0 or punch_hole(fd, off, n) or zero_range(fd, off, n):
        return
    while n > 0:
        k = min(n, len(_ZEROS))
        write(_ZEROS[:k], off)
        off, n = off + k, n - k


def open_image_file(path, fmt, *, writable=False, direct=False, force_share=False,
                    locking=True, remote=None, blkdebug=None, quorum=None):
    """The File of a ``fmt`` ("qcow2"/"raw") image, locked as qemu locks it
    (host/lock.py) unless ``locking`` is False (qemu's locking=off).  A URL
    or an open fsspec file is a remote image (host/remote.py, read-only,
    not locked; ``remote``: its RemoteOptions).  ``blkdebug``: the rules
    of qemu's blkdebug filter over the file (host/blkdebug.py), or None;
    ``quorum``: the image is on a quorum node (host/quorum.py, its
    QuorumSpec; ``path`` is then its name), each child file locked so."""
    if quorum is not None:
        from .quorum import open_quorum
        return open_quorum(quorum, lambda child: open_image_file(
            child, fmt, writable=writable, direct=direct, force_share=force_share,
            locking=locking), zero, writable)
    if is_remote(path):
        from .remote import open_file
        return open_file(path, writable, remote)
    perm, unshared = lock.permissions(fmt, writable, force_share)
    if blkdebug is not None:
        from .._ext.hookfile import debug_file
        f = debug_file(path, blkdebug, writable, direct)
    else:
        f = File(path, writable=writable, direct=direct)
    if locking:
        try:
            lock.lock(f.fd, path, perm, unshared)
        except BaseException:
            f.close()
            raise
    return f


def not_found(path):
    """The error for a file that is not there, carrying qemu-img's words
    for it ("Could not open 'PATH': Could not open 'PATH': No such file or
    directory": the CLI's ``opening``/``qemu`` pair)."""
    e = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    e.opening, e.qemu = path, f"Could not open '{path}': {e.strerror}"
    return e


def open_in_place(path):
    """A qcow2 image's file opened for writing in place and not locked (a
    command that holds the image's locks for its whole run, as check -r
    does, opens it several times): a local file, or a writable remote one
    (``ssh://``, an NBD export), as qemu-img check -r repairs either."""
    return open_image_file(os.fspath(path), "qcow2", writable=True, locking=False)


def pwrite_all(fd, data, off, name=None):
    """Write all of ``data`` at ``off``, in calls of at most QF_WRITE_MAX
    bytes with the GIL released once (a failure names the offset, and ``name``
    when given)."""
    err, at = pwrite_buffers(fd, (data,), off)
    if err:
        raise write_error(OSError(err, os.strerror(err)), at, name)


def write_error(e, off, name):
    """``e`` again, saying where the write failed."""
    return OSError(e.errno, f"write at offset {off:#x}: {e.strerror}", name)


def create_raw(path, nbytes, preallocation="off"):
    """A raw image of ``nbytes``: a new (or emptied) regular file, or an
    existing block device at least that large (left as it is), or a
    file on an ssh:// server (no preallocation there, as qemu's ssh
    driver).  As qemu's file create: ``off`` allocates the first block
    (qemu's allocate_first_block, for its alignment probe), ``falloc``
    fallocates the whole file, ``full`` writes its zeros and syncs them."""
    from .remote import create_file, is_url
    if is_url(path):
        f = create_file(path)
        try:
            f.truncate(nbytes)
        finally:
            f.close()
        return
    lock.check_create(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if is_device(fd):
            set_size(fd, nbytes, path)
            return
        os.ftruncate(fd, 0)
        if preallocation == "falloc":
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                raise OSError(e.errno, f"Could not preallocate new data: {e.strerror}",
                              path) from None
        elif preallocation == "full":
            try:
                for off in range(0, nbytes, len(_ZEROS)):
                    pwrite_all(fd, _ZEROS[:min(len(_ZEROS), nbytes - off)], off, path)
                os.fsync(fd)
            except OSError as e:
                raise OSError(e.errno, "Could not write zeros for preallocation: "
                              f"{e.strerror}", path) from None
        else:
            os.ftruncate(fd, nbytes)
            if nbytes:
                first = FIRST_BLOCK if nbytes >= FIRST_BLOCK else SECTOR
                pwrite_all(fd, _ZEROS[:first], 0, path)
    finally:
        os.close(fd)


class Prefault:
    """Page-cache pages for ranges of a regular file about to be written,
    made ahead of the writer by a helper thread.

    A buffered write into a range the page cache does not hold allocates
    its pages under the file's inode lock, one writer at a time.  Readahead
    (POSIX_FADV_WILLNEED) of a range that is a hole, or past what was
    written, fills new pages with zeros without that lock, on another core;
    the write then only copies into them.  In a VM whose host takes back
    free memory (virtio-balloon free page reporting) a new page costs a
    fault into the host, and this halves a 2.2 GiB conversion (measured:
    docs/convert.md).  Invariant: only ranges inside the file's size at the
    time of ``ahead`` are worth asking for (readahead stops at the end);
    it is advice, so failures are ignored.  At most ``depth`` ranges wait,
    so the helper stays a few batches ahead and ``ahead`` never blocks.

    Where fresh pages are cheap, making them ahead only adds work (their
    zeroing and the readahead bookkeeping: 0.6 s of CPU on a 2 GiB
    conversion, which then takes 1.2 s instead of 0.95).  So the helper
    starts idle and the writer reports its writes (``wrote``): once a
    window of them copied slower than DEAR_BELOW per CPU-second of the
    writing thread (a fault into the host stalls that thread; a
    warm page cache copies at 3-6 GB/s here, a ballooned one at 0.3-0.6),
    the helper starts and stays on for the rest of the file.  ``active``
    says whether it is on."""

    # The kernel reads ahead at most max(io size, readahead window) per
    # call (4 MiB on virtio disks): longer ranges are asked for in pieces.
    PIECE = 4 << 20
    DEAR_BELOW = 1.5e9          # bytes per CPU-second of the writer
    WINDOW = 32 << 20           # bytes of writes a decision looks at

    def __init__(self, fd, depth=16):
        self.fd = fd
        self.active = False
        self._depth = depth
        self._q = self._thread = None
        self._bytes, self._seconds = 0, 0.0

    def wrote(self, nbytes, seconds):
        """The writer copied ``nbytes`` into fresh pages in ``seconds`` of
        its thread's CPU time (``time.thread_time``)."""
        if self.active:
            return
        self._bytes += nbytes
        self._seconds += seconds
        if self._bytes >= self.WINDOW:
            if self._bytes < self.DEAR_BELOW * self._seconds:
                self._start()
            self._bytes, self._seconds = 0, 0.0

    def _start(self):
        self._q = queue.Queue(self._depth)
        self._thread = threading.Thread(target=self._run, name="qcow2fast-prefault",
                                        daemon=True)
        self._thread.start()
        self.active = True

    def ahead(self, off, n):
        """Ask for [off, off+n) (when active); dropped when the helper is
        too far behind."""
        if not self.active:
            return
        try:
            self._q.put_nowait((off, n))
        except queue.Full:
            pass

    def _run(self):
        while (item := self._q.get()) is not None:
            off, n = item
            end = off + n
            try:
                while off < end:
                    k = min(self.PIECE, end - off)
                    os.posix_fadvise(self.fd, off, k, os.POSIX_FADV_WILLNEED)
                    off += k
            except OSError:
                pass

    def close(self):
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None


def prefault_for(fd):
    """A Prefault for ``fd`` if it is a regular file, else None."""
    return Prefault(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else None
