from typing import Final

import numpy as np
from numpy.typing import NDArray
from typing_extensions import Self, disjoint_base

from ..engine.overlap import MetadataMap
from ..engine.snapshot import Snapshot
from ..spec.geometry import Geometry
from ..spec.header import Header
from .cache import TableCache
from .fileio import File

CACHE_MODES: Final[tuple[str, ...]]
ZERO_FROM_NEVER: Final = 4611686018427387904  # 1 << 62

@disjoint_base
class ImageState:
    file: File
    data_file: File
    header: Header
    geo: Geometry
    l2_cache: TableCache
    refcount_cache: TableCache
    metadata: MetadataMap
    snapshot: Snapshot | None
    read_only: bool
    read_only_why: str | None
    writethrough: bool
    unsafe: bool
    lazy_refcounts: bool
    alloc_fast: bool
    closed: bool
    zero_from: int
    alloc_end: int
    host_limit: int
    def __new__(
        cls, path: str, file: File, header: Header, geo: Geometry, cache_mode: str, read_only: bool
    ) -> Self: ...
    @property
    def path(self) -> str: ...
    @property
    def cluster_bits(self) -> int: ...
    @property
    def cluster_size(self) -> int: ...
    @property
    def l2_bits(self) -> int: ...
    @property
    def slice_bits(self) -> int: ...
    @property
    def extended(self) -> bool: ...
    @property
    def unit_bits(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def cache_mode(self) -> str: ...
    def set_size(self, size: int) -> None: ...
    def set_l1(self, l1: NDArray[np.uint64]) -> None: ...
    def set_metadata_bitmap(self, bits: NDArray[np.uint8]) -> None: ...
    def overlaps_metadata(self, host: int, n: int) -> bool: ...
    def grow_host_limit(self, end: int) -> None: ...
    def allocated(self, end: int) -> None: ...
    def read_only_reason(self) -> str: ...
    def barrier(self) -> None: ...
