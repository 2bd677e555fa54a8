"""A window on an image: the ``raw`` format's ``offset``/``size`` options
(qemu block/raw-format.c) and qemu-nbd's ``--offset``.  Guest offset 0 of
the window is ``offset`` of the image below; the window is the usual
block-device interface (host/device.py)."""

from ..errors import InvalidArgumentError
from ..extent import Extent
from ..spec.constants import SECTOR


class RawWindow:
    """``size`` bytes of ``image`` from ``offset``; ``size`` None takes the
    rest of it, rounded up to a whole sector as qemu's block layer does (the
    bytes past the image's end read as zeros, and are not written).
    Closing the window closes the image."""

    header = None
    backing = None

    def __init__(self, image, offset=0, size=None):
        below = image.size
        if size is not None and size % SECTOR:
            raise InvalidArgumentError(f"Specified size is not multiple of {SECTOR}")
        if offset < 0 or (size is not None and size < 0):
            raise InvalidArgumentError("offset and size must not be negative")
        if offset + (size or 0) > below:
            raise InvalidArgumentError(
                f"The sum of offset ({offset}) and size ({size or 0}) has to be smaller or "
                f"equal to the  actual size of the containing file ({below})")
        self.image = image
        self.offset = offset
        self.size = size if size is not None else -(-(below - offset) // SECTOR) * SECTOR
        self._data_end = below - offset      # past this (the rounding), zeros
        self.path = image.path
        self.read_only = image.read_only

    @property
    def closed(self):
        return self.image.closed

    def _check(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgumentError(f"range [{offset}, {offset + length}) is outside the "
                                       f"window of {self.size} bytes")
        return self.offset + offset

    def readinto(self, offset, buf):
        mv = memoryview(buf).cast("B")
        at = self._check(offset, len(mv))
        inside = max(0, min(len(mv), self._data_end - offset))
        if inside:
            self.image.readinto(at, mv[:inside])
        mv[inside:] = bytes(len(mv) - inside)
        return len(mv)

    def read(self, offset, length):
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset, data):
        mv = memoryview(data).cast("B")
        at = self._check(offset, len(mv))
        if offset + len(mv) > self._data_end:
            raise InvalidArgumentError(f"write [{offset}, {offset + len(mv)}) past the end of "
                                       f"the image below ({self._data_end} bytes)")
        return self.image.write(at, mv)

    def flush(self):
        self.image.flush()

    def block_status(self, offset=0, length=None):
        if length is None:
            length = self.size - offset
        at = self._check(offset, length)
        inside = max(0, min(length, self._data_end - offset))
        out = [e._replace(offset=e.offset - self.offset)
               for e in (self.image.block_status(at, inside) if inside else ())]
        if inside < length:
            out.append(Extent(offset + inside, length - inside, "zero", None, 0))
        return out

    @property
    def backing_chain(self):
        return [self.path]

    def close(self):
        self.image.close()
