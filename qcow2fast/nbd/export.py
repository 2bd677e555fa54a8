"""What the server exports: an open image (qcow2 ``Image`` or ``RawImage``)
seen through the NBD protocol's eyes -- its transmission flags, block
status in the protocol's metadata contexts, zeroing and trimming, and the
mapping of the image's exceptions to the protocol's error values.

The image is shared by every connection (it is thread-safe and has one
cache), so a flush on any connection covers the writes of all of them:
that is what NBD_FLAG_CAN_MULTI_CONN promises.
"""

import numpy as np

from .. import open as open_qcow2
from ..engine.backing import probe_format
from ..host.raw import RawImage
from ..errors import InvalidArgumentError, Qcow2Error, ReadOnlyImageError
from . import protocol as P
from .contexts import Contexts, find_bitmaps

# The largest READ/WRITE payload, advertised in NBD_INFO_BLOCK_SIZE.
# Larger requests are refused without allocating anything.
MAX_PAYLOAD = 32 << 20
PREFERRED_BLOCK = 4096

# qemu's --discard and --detect-zeroes values (discard: each alias -> its mode).
DISCARD_MODES = {"ignore": "ignore", "off": "ignore", "unmap": "unmap", "on": "unmap"}
DETECT_ZEROES_MODES = ("off", "on", "unmap")

ZERO_CHUNK = 1 << 20
CACHE_CHUNK = 1 << 20
# Structured READ replies describe holes at least this long with
# NBD_REPLY_TYPE_OFFSET_HOLE chunks (no data sent); smaller reads are
# always one data chunk, without a block status lookup.
HOLE_MIN = 64 << 10


class RequestError(Exception):
    """A request that fails with an NBD error value (and a message)."""

    def __init__(self, error, message):
        super().__init__(message)
        self.error = error


def nbd_error(exc):
    """The protocol's error value for an exception raised by the image."""
    if isinstance(exc, RequestError):
        return exc.error
    if isinstance(exc, ReadOnlyImageError):
        return P.NBD_EPERM
    if isinstance(exc, InvalidArgumentError):
        return P.NBD_EINVAL
    if isinstance(exc, OSError) and not isinstance(exc, Qcow2Error):
        return P.ERRNO_TO_NBD.get(exc.errno, P.NBD_EIO)
    return P.NBD_EIO


def open_export_image(path, *, read_only=False, fmt=None, **options):
    """Open ``path`` for serving: qcow2 through ``qcow2fast.open`` (with
    ``options``), raw as a ``RawImage``; the format is probed when not given."""
    fmt = fmt or probe_format(path)
    if fmt == "raw":
        if options:
            raise InvalidArgumentError("cache options apply to qcow2 images only")
        return RawImage(path, writable=not read_only)
    if fmt != "qcow2":
        raise InvalidArgumentError(f"unsupported format {fmt!r} (supported: qcow2, raw)")
    return open_qcow2(path, "r" if read_only else "r+", **options)


def _merged(runs):
    """(flag, offset, length) runs in order, neighbours with the same flag joined."""
    out = []
    for flag, off, n in runs:
        if out and out[-1][0] == flag:
            out[-1][2] += n
        else:
            out.append([flag, off, n])
    return out


class Export:
    """One image under one export name."""

    def __init__(self, image, name="", description=None, read_only=None, *,
                 allocation_depth=True, bitmaps=(), multi_conn=True, discard="unmap",
                 detect_zeroes="off"):
        if discard not in DISCARD_MODES:
            raise InvalidArgumentError(f"Invalid discard mode `{discard}'")
        if detect_zeroes not in DETECT_ZEROES_MODES:
            raise InvalidArgumentError("Failed to parse detect_zeroes mode: invalid "
                                       f"parameter value: {detect_zeroes}")
        if detect_zeroes == "unmap" and DISCARD_MODES[discard] != "unmap":
            raise InvalidArgumentError("setting detect-zeroes to unmap is not allowed "
                                       "without setting discard operation to unmap")
        self.image = image
        self.name = name
        self.description = description
        self.size = image.size
        self.read_only = bool(image.read_only if read_only is None else read_only) \
            or image.read_only
        self.qcow2 = getattr(image, "header", None) is not None
        self.contexts = Contexts(allocation_depth, find_bitmaps(image, bitmaps))
        self.multi_conn = multi_conn
        # qemu's BDRV_O_UNMAP: without it TRIM does nothing and zeroing keeps clusters
        self.unmap = DISCARD_MODES[discard] == "unmap"
        self.detect_zeroes = detect_zeroes

    def matches(self, name):
        """The export answers to its name, and to "" (the default export)."""
        return name in (self.name, "")

    def transmission_flags(self, structured):
        # (FUA even when read-only, as qemu's nbd_export_create sets it)
        flags = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA
        if self.multi_conn:
            flags |= P.NBD_FLAG_CAN_MULTI_CONN
        if self.read_only:
            flags |= P.NBD_FLAG_READ_ONLY
        else:
            flags |= (P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES
                      | P.NBD_FLAG_SEND_FAST_ZERO)
        flags |= P.NBD_FLAG_SEND_CACHE
        if structured:
            flags |= P.NBD_FLAG_SEND_DF
        return flags

    # -- reads ----------------------------------------------------------------------------

    def read_runs(self, offset, length):
        """[(is_hole, offset, length), ...] covering the range: holes are what
        reads as zeros without data behind it (base:allocation's holes, zero
        and unallocated extents together), at least HOLE_MIN bytes long;
        shorter ones are sent as data."""
        zeros = _merged((e.kind in ("zero", "unallocated"), e.offset, e.length)
                        for e in self.image.block_status(offset, length))
        return _merged((z and n >= HOLE_MIN, off, n) for z, off, n in zeros)

    def cache(self, offset, length):
        """NBD_CMD_CACHE: read the range (filling the image's metadata
        cache and the host's page cache), through one bounded buffer."""
        buf = memoryview(bytearray(min(length, CACHE_CHUNK)))
        for pos in range(offset, offset + length, CACHE_CHUNK):
            self.image.readinto(pos, buf[:min(CACHE_CHUNK, offset + length - pos)])

    # -- writes other than WRITE ----------------------------------------------------------

    def zeroing_is_fast(self, may_unmap):
        """NBD_CMD_FLAG_FAST_ZERO: zeroing is fast when it only rewrites L2
        entries (qcow2 v3 zero flag, or v2 deallocation without a backing
        file); the partial clusters at the edges of a request are written,
        at most two clusters.  Raw files are zeroed by writing: not fast."""
        img = self.image
        if not self.qcow2:
            return False
        return img.version >= 3 or (img.backing is None and may_unmap and self.unmap)

    def write(self, offset, data):
        """NBD_CMD_WRITE; with --detect-zeroes, a buffer of zeros is written
        as zeroes (unmapping with ``unmap``, as qemu's detect-zeroes)."""
        if self.detect_zeroes != "off" and not np.frombuffer(data, np.uint8).any():
            return self.write_zeroes(offset, len(data), self.detect_zeroes == "unmap")
        self.image.write(offset, data)

    def write_zeroes(self, offset, length, may_unmap):
        may_unmap = may_unmap and self.unmap
        if self.qcow2:
            self.image.write_zeroes(offset, length, may_unmap=may_unmap)
            return
        zeros = memoryview(bytes(min(ZERO_CHUNK, length)))
        for pos in range(offset, offset + length, ZERO_CHUNK):
            self.image.write(pos, zeros[:min(ZERO_CHUNK, offset + length - pos)])

    def trim(self, offset, length):
        """A hint: qcow2 frees the whole clusters inside (unless discard is
        ignored, qemu-nbd's default); raw files keep their data."""
        if self.qcow2 and self.unmap:
            self.image.discard(offset, length)
