from collections.abc import Callable
from types import ModuleType
from typing import Any

from typing_extensions import disjoint_base

from ._typing import Buffer

POLL_NS: int
POLL_REST_MIN: int
POLL_REST_MAX: int
PYTHON: int
CLOSED: int

@disjoint_base
class Polling:
    rest: int
    backoff: int
    def __init__(self, rest: int = 0, backoff: int = ...) -> None: ...

def recv_polled(fd: int, buf: Buffer, polling: Polling) -> int: ...

@disjoint_base
class BitmapStatusLoop:
    def __init__(self, protocol: ModuleType, lookup: Callable[[str], Any], name: str, cid: int,
                 size: int, flags: int, room: int, most: int) -> None: ...
    def run(self, fd: int, rbuf: bytearray, rpos: int, rend: int, obuf: bytearray, olen: int,
            polling: Polling) -> tuple[int, int, int, int, int]: ...
