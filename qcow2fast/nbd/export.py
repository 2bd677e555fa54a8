"""What the server exports: an open image (qcow2 ``Image`` or ``RawImage``)
seen through the NBD protocol's eyes -- its transmission flags, block
status in the protocol's metadata contexts, zeroing and trimming, and the
mapping of the image's exceptions to the protocol's error values.

The image is shared by every connection (it is thread-safe and has one
cache), so a flush on any connection covers the writes of all of them:
that is what NBD_FLAG_CAN_MULTI_CONN promises.
"""

from .. import open as open_qcow2
from ..engine.backing import probe_format
from ..host.raw import RawImage
from ..errors import InvalidArgumentError, Qcow2Error, ReadOnlyImageError
from . import protocol as P

# The largest READ/WRITE payload, advertised in NBD_INFO_BLOCK_SIZE.
# Larger requests are refused without allocating anything.
MAX_PAYLOAD = 32 << 20
PREFERRED_BLOCK = 4096

# Metadata contexts offered, with the id each is given when selected.
CONTEXTS = {P.BASE_ALLOCATION: 1, P.QEMU_ALLOCATION_DEPTH: 2}

# A block status reply carries at most this many descriptors per context
# (the protocol lets the server describe less than the requested range).
MAX_DESCRIPTORS = 1 << 16

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

    def __init__(self, image, name="", description=None, read_only=None):
        self.image = image
        self.name = name
        self.description = description
        self.size = image.size
        self.read_only = bool(image.read_only if read_only is None else read_only) \
            or image.read_only
        self.qcow2 = getattr(image, "header", None) is not None

    def matches(self, name):
        """The export answers to its name, and to "" (the default export)."""
        return name in (self.name, "")

    def transmission_flags(self, structured):
        flags = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_CAN_MULTI_CONN
        if self.read_only:
            flags |= P.NBD_FLAG_READ_ONLY
        else:
            flags |= (P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_TRIM
                      | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO)
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
        return img.version >= 3 or (img.backing is None and may_unmap)

    def write_zeroes(self, offset, length, may_unmap):
        if self.qcow2:
            self.image.write_zeroes(offset, length, may_unmap=may_unmap)
            return
        zeros = memoryview(bytes(min(ZERO_CHUNK, length)))
        for pos in range(offset, offset + length, ZERO_CHUNK):
            self.image.write(pos, zeros[:min(ZERO_CHUNK, offset + length - pos)])

    def trim(self, offset, length):
        """A hint: qcow2 frees the whole clusters inside; raw files keep their data."""
        if self.qcow2:
            self.image.discard(offset, length)

    # -- block status -------------------------------------------------------------------------

    def block_status(self, offset, length, context_ids, req_one):
        """For each selected context id: [(length, flags), ...] describing
        [offset, offset+length) from its start (possibly less than all of it)."""
        extents = self.image.block_status(offset, length)
        out = []
        for name, cid in context_ids:
            state = _base_allocation if name == P.BASE_ALLOCATION else (
                _allocation_depth if self.qcow2 else _raw_depth)
            descs = []
            for e in extents:
                flags = state(e)
                if descs and descs[-1][1] == flags:
                    descs[-1][0] += e.length
                elif descs and (req_one or len(descs) == MAX_DESCRIPTORS):
                    break
                else:
                    descs.append([e.length, flags])
            out.append((cid, descs))
        return out


def _base_allocation(e):
    """Data (and compressed data) is allocated; zero clusters and
    unallocated ranges (through the whole chain) read as zeros and are holes."""
    if e.kind in ("zero", "unallocated"):
        return P.NBD_STATE_HOLE | P.NBD_STATE_ZERO
    return 0


def _allocation_depth(e):
    """qemu:allocation-depth: 0 unallocated in the whole chain, 1 this
    image, 2 its backing file, ..."""
    return 0 if e.kind == "unallocated" else e.depth + 1


def _raw_depth(e):
    return 1        # a raw file has one layer, and all of it is "allocated"
