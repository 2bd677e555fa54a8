from collections.abc import Callable, Sequence

from array import array
from typing_extensions import Self, disjoint_base

from ._typing import Buffer
from .hooks import ChainStep
from .resolved import ResolvedMap

@disjoint_base
class ChainCore(ChainStep):
    lazy: bool
    resume: Callable[[int], object] | None
    layer_lookups: int
    walks: int
    slow_reads: int
    def __new__(cls, layers: Sequence[object], rmap: ResolvedMap | None) -> Self: ...
    @property
    def depth(self) -> int: ...
    @property
    def rmap(self) -> ResolvedMap | None: ...
    @property
    def last_used_clock(self) -> array[int]: ...
    def read_into(self, first: int, pos: int, buf: Buffer) -> None: ...
    def invalidate(self, offset: int = 0, length: int | None = None) -> None: ...
    def replace_layer(self, j: int, layer: object) -> None: ...
    def size_of(self, j: int) -> int: ...
