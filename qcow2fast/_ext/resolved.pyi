from typing import Final

from typing_extensions import Self, disjoint_base

from .cache import TableCache
from .fileio import File

BLOCK_UNITS: Final = 256
ENTRY_BYTES: Final = 16
KIND_NAMES: Final[dict[int, str]]

@disjoint_base
class ResolvedMap:
    hits: int
    misses: int
    def __new__(cls, file: File, unit_bits: int, budget_bytes: int) -> Self: ...
    @property
    def unit_bits(self) -> int: ...
    @property
    def blocks(self) -> TableCache: ...
    @property
    def block_bytes(self) -> int: ...
    @property
    def nslots(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def invalidate(self, offset: int = 0, length: int | None = None) -> None: ...
    def entry(self, offset: int) -> tuple[str, int, int | None] | None: ...
