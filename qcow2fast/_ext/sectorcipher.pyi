from collections.abc import Callable
from typing import Final

from typing_extensions import Self, disjoint_base

from ._typing import Buffer
from .hooks import DataTransform

IV_NONE: Final[int]
IV_PLAIN: Final[int]
IV_PLAIN64: Final[int]
IV_ESSIV: Final[int]

MODE_ECB: Final[int]
MODE_CBC: Final[int]
MODE_CTR: Final[int]
MODE_XTS: Final[int]

@disjoint_base
class SectorCipher:
    def encrypt(self, buf: Buffer, sector: int) -> None: ...
    def decrypt(self, buf: Buffer, sector: int) -> None: ...
    def close(self) -> None: ...

@disjoint_base
class EvpSectorCipher(SectorCipher):
    def __new__(cls, entry_points: tuple[int, int, int],
                make_contexts: Callable[[bool], tuple[int, int]], ivgen: int) -> Self: ...
    @property
    def ivgen(self) -> int: ...

@disjoint_base
class BlockSectorCipher(SectorCipher):
    def __new__(cls, functions: tuple[int, int, int, int], schedules: tuple[int, int, int, int],
                block: int, mode: int, ivgen: int, keep: object) -> Self: ...
    @property
    def ivgen(self) -> int: ...

@disjoint_base
class SectorTransform(DataTransform):
    def __init__(self, block_size: int, cipher: SectorCipher, by_guest: bool = False) -> None: ...
    @property
    def cipher(self) -> SectorCipher: ...
    @property
    def by_guest(self) -> bool: ...
