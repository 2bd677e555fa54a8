from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from ._typing import Buffer

_Buf = TypeVar("_Buf")
_Data = TypeVar("_Data")

def timed_requests(
    readinto: Callable[[int, _Buf], object],
    write: Callable[[int, _Data], object],
    offsets: NDArray[np.int64],
    writes: Buffer,  # one uint8 a request: nonzero for a write
    buf: _Buf,
    data: _Data,
    lat: NDArray[np.int64],
    errors: list[Any],  # only its emptiness is read
) -> int: ...
