"""Backing files: resolving, opening and bounding the chain.

Unlike qemu 7.2, a chain is bounded (MAX_CHAIN_DEPTH) and a loop is an
error, and a backing file without a recorded format is probed only for the
qcow2 magic (anything else is read as raw).
"""

import errno
import os

from ..spec import header as hdr
from ..errors import CorruptImageError, UnsupportedFeatureError
from ..extent import Extent

MAX_CHAIN_DEPTH = 64


def resolve_backing_path(image_path, name):
    """qemu resolves a relative backing name against the image's directory."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def probe_format(path):
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == hdr.QCOW_MAGIC else "raw"


def open_backing(img, chain):
    """Open ``img``'s backing file read-only; ``chain`` holds the real paths
    of the images above it."""
    from .image import Image

    name = img.header.backing_file
    if ":" in name.split("/")[0] and not os.path.exists(resolve_backing_path(img.path, name)):
        raise UnsupportedFeatureError(f"backing file {name!r}: protocols are not supported",
                                      feature="backing protocol")
    path = resolve_backing_path(img.path, name)
    chain = chain + (os.path.realpath(img.path),)
    where = hdr.FIELD_OFFSET["backing_file_offset"]
    if os.path.realpath(path) in chain:
        raise CorruptImageError(f"backing chain loops: {img.path} -> {name} is already in the "
                                "chain", offset=where, field="backing_file")
    if len(chain) >= MAX_CHAIN_DEPTH:
        raise CorruptImageError(f"backing chain deeper than {MAX_CHAIN_DEPTH} images",
                                offset=where, field="backing_file")
    if not os.path.exists(path):
        raise FileNotFoundError(2, f"could not open backing file {name!r} of {img.path}", path)
    fmt = img.header.backing_format or probe_format(path)
    if fmt == "qcow2":
        return Image(path, "r", cache_mode=_read_cache_mode(img.cache_mode),
                     cache_clean_interval=0, _chain=chain)
    if fmt == "raw":
        return RawImage(path)
    raise UnsupportedFeatureError(f"backing file format {fmt!r} is not supported",
                                  feature="backing format")


def _read_cache_mode(mode):
    return "none" if mode in ("none", "directsync") else "writeback"


class RawImage:
    """A raw file: a backing image, or a raw image opened by the command line."""

    header = None

    def __init__(self, path, writable=False):
        self.path = path
        self._f = open(path, "r+b" if writable else "rb", buffering=0)
        self.size = os.lseek(self._f.fileno(), 0, os.SEEK_END)   # block devices too
        self.read_only = not writable
        self.backing = None
        self.closed = False

    def write(self, offset, data):
        return os.pwrite(self._f.fileno(), data, offset)

    def flush(self):
        os.fsync(self._f.fileno())

    def readinto(self, offset, buf):
        mv = memoryview(buf).cast("B")
        n = os.preadv(self._f.fileno(), [mv], offset)
        if n < len(mv):
            mv[n:] = bytes(len(mv) - n)
        return len(mv)

    def read(self, offset, length):
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def block_status(self, offset=0, length=None):
        """Data and holes (SEEK_DATA/SEEK_HOLE); holes read as zeros."""
        if length is None:
            length = self.size - offset
        end, pos, out = offset + length, offset, []
        fd = self._f.fileno()
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
            self._f.close()
            self.closed = True
