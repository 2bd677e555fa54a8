"""A conversion's destination (ops/convert.py): a new regular file under a
temporary name renamed over the target on success, a block device, stdout,
or an NBD export or ssh:// file (ops/nbd_target.py) written as a stream or
at random."""

import errno
import os
import sys

from ..errors import InvalidArgumentError
from ..host import file as hostfile
from ..host.file import pwrite_all
from .nbd_target import NbdStream, is_remote_target, open_export

HEADER_WIPE = 64 << 10       # zeroed on a device when a new image on it fails


class Output:
    """The destination file: a temporary name renamed over ``dest`` on
    success (regular files), the device itself, or stdout; or an NBD
    export, written as a ``stream`` or at random (raw).  ``device``: a
    block device or an export (fixed size, holding old data: see hostfile)."""

    def __init__(self, dest, in_place, stream=False, image=False):
        """``image``: an existing image the engine opens itself (an export's
        connection is then the engine's, not this object's)."""
        self.dest, self.tmp, self.fd, self.device = dest, None, None, False
        self.in_place = in_place
        self.nbd = self.export = None
        if is_remote_target(dest):      # (ops/nbd_target.py)
            if stream:
                self.nbd = NbdStream(dest)
                self.fd = self.nbd.fd
            elif not image:
                self.export = open_export(dest, create=not in_place)
                self.device = not hasattr(self.export, "resize")    # (an export's fixed size)
            return
        if dest == "-":
            self.fd = sys.stdout.buffer.fileno()
            if os.isatty(self.fd):
                raise InvalidArgumentError("refusing to write an image to a terminal "
                                           "(redirect stdout)")
            sys.stdout.flush()
            return
        if in_place or (os.path.exists(dest) and not os.path.isfile(dest)):
            self.fd = os.open(dest, os.O_RDWR)
            self.device = hostfile.is_device(self.fd)
            return
        d, base = os.path.split(os.path.abspath(dest))
        self.tmp = os.path.join(d, f".{base}.qcow2fast-{os.getpid()}")
        try:
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            self.tmp = None
            raise OSError(e.errno, f"cannot create the target: {e.strerror}", dest) from None

    @property
    def path(self):
        return self.tmp or self.dest

    @property
    def stream(self):
        """Written in order, never sought (stdout, an NBD export)."""
        return self.dest == "-" or self.nbd is not None

    # -- random access (a raw target) --------------------------------------------------

    def size(self):
        return self.export.size if self.export is not None else hostfile.size(self.fd)

    def set_size(self, nbytes):
        if self.export is None:
            hostfile.set_size(self.fd, nbytes, self.dest)
        elif hasattr(self.export, "resize"):        # an ssh:// file
            self.export.resize(nbytes)
        elif nbytes > self.export.size:
            raise OSError(errno.ENOSPC, f"an NBD export cannot grow: {nbytes} bytes are "
                          f"needed and the export has {self.export.size}", self.dest)

    def pwrite(self, data, off):
        if self.export is not None:
            self.export.pwrite(data, off)
        else:
            pwrite_all(self.fd, data, off, self.dest)

    def zero(self, off, n, write):
        """[off, off+n) made to read as zeros (hostfile.zero; an export's write-zeroes)."""
        if self.export is not None:
            self.export.write_zeroes(off, n)
        else:
            hostfile.zero(self.fd, off, n, write)

    def commit(self, sync):
        if is_remote_target(self.dest) and self.export is None and self.nbd is None:
            return                      # (the engine's image, closed and flushed)
        if self.export is not None:
            self.export.flush()         # (always: the export's writes stable, as a stream's)
            return
        if self.nbd is not None:
            nbd, self.nbd, self.fd = self.nbd, None, None
            nbd.finish(ok=True)
            return
        if sync and self.dest != "-":
            os.fsync(self.fd)
        if self.tmp:
            os.replace(self.tmp, self.dest)
            self.tmp = None

    def close(self, ok):
        if is_remote_target(self.dest) and self.export is None and self.nbd is None:
            return
        if self.export is not None:
            self.export.close()
            self.export = None
            return
        if self.nbd is not None:
            nbd, self.nbd, self.fd = self.nbd, None, None
            nbd.finish(ok=False)        # (raises the sender's error: the cause)
            return
        if not ok and self.device and not self.in_place and self.fd is not None:
            # A failed new image on a device must not look like a valid one
            # (a regular file's temporary is deleted instead).
            try:
                pwrite_all(self.fd, bytes(HEADER_WIPE), 0)
            except OSError:
                pass                # the error being reported says more
        if self.fd is not None and self.dest != "-":
            os.close(self.fd)
        self.fd = None
        if self.tmp and not ok:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
