from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from ._typing import Buffer
from .core import ImageCore

READ: int
WRITE: int

def io_engine() -> Literal["auto", "io_uring", "pread"]: ...
def set_io_engine(name: str) -> str: ...
def submit(
    img: ImageCore, requests: Sequence[tuple[int | str, int, Buffer]]
) -> list[int | BaseException]: ...
def readv_into(img: ImageCore, offsets: Sequence[int], buffers: Sequence[Buffer]) -> int: ...
def timed_batches(
    img: ImageCore,
    offsets: NDArray[np.int64],
    writes: Buffer,  # one uint8 a request: nonzero for a write
    bufs: list[bytearray],
    data: Buffer,
    depth: int,
    lat: NDArray[np.int64],
    stop: bytearray | None = None,  # stop[0] set: a sharing worker failed
) -> int: ...
def set_async_split(split: int) -> int: ...
def one_requests() -> int: ...
