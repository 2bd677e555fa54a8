from collections.abc import Callable
from types import ModuleType
from typing import Any

from typing_extensions import disjoint_base

from ._typing import Buffer
from .core import ImageCore

POLL_NS: int
POLL_REST_MIN: int
POLL_REST_MAX: int
PYTHON: int
CLOSED: int
FAILED: int

@disjoint_base
class Polling:
    rest: int
    backoff: int
    def __init__(self, rest: int = 0, backoff: int = ...) -> None: ...

def recv_polled(fd: int, buf: Buffer, polling: Polling) -> int: ...

@disjoint_base
class RequestLoop:
    def __init__(self, protocol: ModuleType, size: int, structured: bool) -> None: ...
    def serve_reads(self, image: ImageCore, below: int) -> None: ...
    def serve_bitmap(self, lookup: Callable[[str], Any], name: str, cid: int, flags: int,
                     room: int, most: int) -> None: ...
    def run(self, fd: int, rbuf: bytearray, rpos: int, rend: int, obuf: bytearray, olen: int,
            polling: Polling) -> tuple[int, int, int, int, int]: ...
    def take_failure(self) -> BaseException | None: ...
