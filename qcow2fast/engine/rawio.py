"""A seekable ``io.RawIOBase`` view of an image's guest disk."""

import io

from ..errors import ReadOnlyImageError


class ImageFile(io.RawIOBase):
    def __init__(self, image):
        super().__init__()
        self.image = image
        self._pos = 0

    def readable(self):
        return True

    def writable(self):
        return not self.image.read_only

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, offset, whence=io.SEEK_SET):
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.image.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, b):
        self._checkClosed()
        mv = memoryview(b).cast("B")
        n = max(0, min(len(mv), self.image.size - self._pos))
        if n:
            self.image.readinto(self._pos, mv[:n])
            self._pos += n
        return n

    def write(self, b):
        self._checkClosed()
        if self.image.read_only:
            raise ReadOnlyImageError(f"{self.image.path}: image is open read-only")
        mv = memoryview(b).cast("B")
        n = max(0, min(len(mv), self.image.size - self._pos))
        if n == 0 and len(mv):
            raise OSError(28, "write past the end of the virtual disk")
        self.image.write(self._pos, mv[:n])
        self._pos += n
        return n

    def flush(self):
        if not self.closed and not self.image.read_only and not self.image.closed:
            self.image.flush()
