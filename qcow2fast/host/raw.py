"""Raw images: a raw backing file, or a raw image opened by the command
line or the NBD server, behind the same small block-device interface as
:class:`qcow2fast.Image` (``size``, ``read``/``readinto``, ``write``,
``flush``, ``block_status``, ``close``, ``backing``)."""

import errno
import os

from . import file as hostfile
from .file import open_image_file
from .remote import is_remote, name_of
from ..extent import Extent, merge_extents
from ..spec.constants import whole_sectors


class RawImage:
    """A raw file or block device; its host offsets are its guest offsets."""

    header = None
    backing = None
    format = "raw"                      # as qemu-img info names it (an NBD node: "nbd")

    def __init__(self, path, writable=False, *, force_share=False, locking=True, remote=None,
                 quorum=None):
        self.path = name_of(path) if is_remote(path) else path
        self.force_share, self.locking, self.remote_options = force_share, locking, remote
        self.file = open_image_file(path, "raw", writable=writable, force_share=force_share,
                                    locking=locking, remote=remote, quorum=quorum)
        # lseek: block devices too; whole sectors, as qemu has it (the tail reads as zeros)
        self.size = whole_sectors(self.file.size())
        self.read_only = not writable
        self.closed = False

    def write(self, offset, data):
        return self.file.pwrite(data, offset)

    def write_zeroes(self, offset, length, *, may_unmap=False):
        """Make [offset, offset+length) read as zeros (a hole where the
        file system can punch one)."""
        hostfile.zero(self.file.fd, offset, length, self.file.pwrite)

    def grow(self, size):
        """Make the file ``size`` bytes long (the new part reads as zeros);
        a block device must already hold them."""
        if size > self.size:
            hostfile.set_size(self.file.fd, size, self.path)
            self.size = size

    def flush(self):
        self.file.sync_all()

    def readinto(self, offset, buf):
        """Read ``len(buf)`` bytes at ``offset``; past the end reads zeros."""
        mv = memoryview(buf).cast("B")
        self.file.preadinto(mv, offset)
        return len(mv)

    def read(self, offset, length):
        return self.file.pread(offset, length)

    def block_status(self, offset=0, length=None):
        """Data and holes (SEEK_DATA/SEEK_HOLE; an NBD export's block
        status); holes read as zeros."""
        if length is None:
            length = self.size - offset
        source = getattr(getattr(self.file, "reader", None), "source", None)
        if getattr(source, "block_status", None) is not None:
            return _export_status(source.block_status, offset, min(length, source.size - offset))
        end, pos, out = offset + length, offset, []
        fd = self.file.fd
        while pos < end:
            try:
                data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
            except OSError as e:
                if e.errno != errno.ENXIO:      # no SEEK_DATA here: all of it is data
                    out.append(Extent(pos, end - pos, "data", pos, 0))
                    break
                data = end                      # ENXIO: no data past pos
            if data > pos:
                out.append(Extent(pos, data - pos, "zero", None, 0))
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            out.append(Extent(data, hole - data, "data", data, 0))
            pos = hole
        return out

    @property
    def backing_chain(self):
        return [self.path]

    def close(self):
        if not self.closed:
            self.file.close()
            self.closed = True


def _export_status(status, offset, length):
    """Extents from an NBD export's base:allocation (nbd/client.py): a hole
    that reads as zeros is "zero", one that may not "unallocated" (contents
    unknown, as qemu has it), the rest data (all of it, when the server
    has no block status); zeros that are not a hole (allocated) have a host
    offset, as data has; the sector tail past the export reads as zeros."""
    from ..nbd.protocol import NBD_STATE_HOLE, NBD_STATE_ZERO    # (nbd imports this module)
    out, pos, end = [], offset, offset + max(0, length)
    while pos < end:
        descriptors = status(pos, end - pos)
        if descriptors is None:
            out.append(Extent(pos, end - pos, "data", pos, 0))
            break
        for n, flags in descriptors:
            n = min(n, end - pos)
            kind = "zero" if flags & NBD_STATE_ZERO else \
                "unallocated" if flags & NBD_STATE_HOLE else "data"
            # (an offset: allocated -- data, or zeros that are not a hole)
            out.append(Extent(pos, n, kind, None if flags & NBD_STATE_HOLE else pos, 0))
            pos += n
            if pos >= end:
                break
    return merge_extents(out)
