"""The small block-device interface that every image behind qcow2fast's
front ends offers -- a qcow2 :class:`qcow2fast.Image` and a
:class:`qcow2fast.host.raw.RawImage` alike -- so that the NBD server,
``convert``, ``compare``, ``dd`` and ``bench`` take either."""

from typing import List, Optional, Protocol, Union, runtime_checkable

from ..extent import Extent

BytesLike = Union[bytes, bytearray, memoryview]


@runtime_checkable
class BlockDevice(Protocol):
    path: str
    size: int                       # guest bytes
    read_only: bool
    closed: bool
    backing: Optional["BlockDevice"]

    def read(self, offset: int, length: int) -> bytes: ...

    def readinto(self, offset: int, buf: BytesLike) -> int: ...

    def write(self, offset: int, data: BytesLike) -> int: ...

    def flush(self) -> None: ...

    def block_status(self, offset: int = 0, length: Optional[int] = None) -> List[Extent]: ...

    def close(self) -> None: ...
