"""Image locks with the bytes and meaning of qemu's file-posix driver
(block/file-posix.c: raw_apply_lock_bytes, raw_check_lock_bytes).

qemu takes shared OFD byte-range locks (F_OFD_SETLK, F_RDLCK) on the image
file, one byte per block permission (include/block/block-common.h):

- byte ``LOCK_PERM_BASE + i`` while it *uses* permission bit i;
- byte ``LOCK_SHARED_BASE + i`` while it does *not share* permission bit i.

An opener that wants permission i fails if anyone holds byte 200+i
(``Failed to get "write" lock``); one that does not share permission i
fails if anyone holds byte 100+i (``Failed to get shared "write" lock``).
Locks are taken first and checked after (as qemu does), so of two openers
racing, at least one sees the other.  An OFD lock belongs to the open file
description: it is released when the descriptor is closed, and two
descriptors of one process conflict like two processes.

What qemu 7.2 asks of a file (seen in /proc/locks):

=======================  ==================================  ====================
opened as                uses                                does not share
=======================  ==================================  ====================
qcow2, read-only         consistent read                     write, resize
qcow2, read-write        consistent read, write, resize      write, resize
raw, read-only           consistent read                     --
raw, read-write          consistent read, write              --
``force_share`` (-U)     consistent read                     --
=======================  ==================================  ====================

A backing file is opened read-only, with the force-share of the image
above it.
"""

import errno
import fcntl
import os
import struct

from ..errors import ImageLockedError, InvalidArgumentError

PERM_CONSISTENT_READ = 0x01
PERM_WRITE = 0x02
PERM_WRITE_UNCHANGED = 0x04
PERM_RESIZE = 0x08
PERM_ALL = 0x0f
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")    # bdrv_perm_names

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding).
_FLOCK = struct.Struct("@hhqqi4x")
_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", None)
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
# Filesystems without byte-range locks: the image is used unlocked, as
# qemu's locking=auto does where OFD locks are unavailable.
_NO_LOCKS = (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def permissions(fmt, writable, force_share=False):
    """(perm, unshared) qemu asks of a ``fmt`` ("qcow2" or "raw") file."""
    if force_share and writable:
        raise InvalidArgumentError("force-share=on can only be used with read-only images")
    perm = PERM_CONSISTENT_READ
    if writable:
        perm |= PERM_WRITE | (PERM_RESIZE if fmt == "qcow2" else 0)
    # qcow2 caches metadata, so it never lets another writer in; raw does.
    unshared = PERM_WRITE | PERM_RESIZE if fmt == "qcow2" and not force_share else 0
    return perm, unshared


def _fcntl(fd, cmd, ltype, start):
    return _FLOCK.unpack(fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, start, 1, 0)))


def _bits(mask):
    return [i for i in range(len(PERM_NAMES)) if mask >> i & 1]


def apply(fd, perm, unshared):
    """Take the lock bytes of ``perm`` and ``unshared``; False where the
    file cannot be locked."""
    if _OFD_SETLK is None:
        return False
    try:
        for i in _bits(perm):
            _fcntl(fd, _OFD_SETLK, fcntl.F_RDLCK, LOCK_PERM_BASE + i)
        for i in _bits(unshared):
            _fcntl(fd, _OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + i)
    except OSError as e:
        if e.errno in _NO_LOCKS:
            return False
        raise
    return True


def release(fd):
    """Drop every lock byte this descriptor holds."""
    for base in (LOCK_PERM_BASE, LOCK_SHARED_BASE):
        fcntl.fcntl(fd, _OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, base,
                                                len(PERM_NAMES), 0))


def conflict(fd, perm, unshared):
    """qemu's message for the first permission another descriptor's locks
    deny (None when there is none)."""
    for i in _bits(perm):
        if _fcntl(fd, _OFD_GETLK, fcntl.F_WRLCK, LOCK_SHARED_BASE + i)[0] != fcntl.F_UNLCK:
            return f'Failed to get "{PERM_NAMES[i]}" lock'
    for i in _bits(unshared):
        if _fcntl(fd, _OFD_GETLK, fcntl.F_WRLCK, LOCK_PERM_BASE + i)[0] != fcntl.F_UNLCK:
            return f'Failed to get shared "{PERM_NAMES[i]}" lock'
    return None


def lock(fd, name, perm, unshared, context=None):
    """Lock ``fd`` (the file ``name``) for ``perm`` not sharing
    ``unshared``; raise ImageLockedError, with qemu's words, when another
    opener's locks forbid it (nothing stays locked then).  ``context``
    prefixes the message (default: ``Could not open 'NAME'``)."""
    if not apply(fd, perm, unshared):
        return
    why = conflict(fd, perm, unshared)
    if why is None:
        return
    release(fd)
    if context is None:
        context = f"Could not open '{name}'"
    detail = f"{why}\nIs another process using the image [{name}]?"
    raise ImageLockedError(f"{context}: {detail}", path=name, detail=detail)


def take_over(fd, fmt):
    """Take a writer's lock bytes on ``fd`` without the check, for a writer
    opened (with ``locking=False``) by a process that already keeps other
    writers out through another descriptor of the file -- commit's base,
    which the chain above it holds read-only -- as qemu reopens that node
    read-write.  Other readers are then refused, as under qemu's commit.
    A remote file (hookfile.NO_FD: no descriptor) has no locks to take."""
    from .._ext.hookfile import NO_FD
    if fd != NO_FD:
        apply(fd, *permissions(fmt, True))


def check_create(path):
    """Refuse to create (truncate) ``path`` while another process uses it,
    as qemu's file-posix create does: it asks for write and resize and
    does not share resize.  Nothing stays locked (closing the descriptor
    releases its locks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        lock(fd, path, PERM_WRITE | PERM_RESIZE, PERM_RESIZE, context=path)
    finally:
        os.close(fd)


class Holder:
    """A descriptor of ``path`` that only holds locks (a command that opens
    the file several times, such as ``check -r``, holds them once)."""

    def __init__(self, path, fmt, writable, force_share=False):
        perm, unshared = permissions(fmt, writable, force_share)
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            lock(self.fd, path, perm, unshared)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
