import numpy as np
from numpy.typing import NDArray

from ._typing import Buffer

def l2_next_run(
    l2: NDArray[np.uint64],
    i: int,
    count: int,
    cluster_bits: int,
    need_copied: bool = False,
    extended: bool = False,
    data0: bool = False,
) -> tuple[int, int, int]: ...
def refcount_get(blk: Buffer, i: int, order: int) -> int: ...
def refcount_set(blk: Buffer, i: int, order: int, value: int) -> None: ...
def refcount_decode(blk: Buffer, order: int, out: NDArray[np.uint64]) -> None: ...
def refcount_encode(values: NDArray[np.uint64], order: int, blk: Buffer) -> None: ...
def l2_entry_kind(entry: int, data0: bool = False) -> int: ...
def tally_add(counts: NDArray[np.uint32], clusters: NDArray[np.int64]) -> None: ...

# ``tables``: 2-D, one L2 table a row, in on-disk (big-endian) words viewed as uint64.
def l2_tally_tables(
    tables: NDArray[np.uint64],
    counts: NDArray[np.uint32],
    odd: Buffer,
    cluster_bits: int,
    file_size: int,
    extended: bool = False,
) -> tuple[int, int, int]: ...
def l2_copied_rows(
    tables: NDArray[np.uint64],
    state: Buffer,
    cluster_bits: int,
    wrong: Buffer,
    extended: bool = False,
    fix: bool = False,
) -> None: ...
def ext_set_range(
    words: NDArray[np.uint64],
    u0: int,
    u1: int,
    reads_zero: bool,
    unmap: bool,
    cluster_bits: int,
    released: NDArray[np.uint64],
) -> tuple[bool, int, int]: ...
def nonzero_units(buf: Buffer, unit: int, out: Buffer) -> None: ...
def differing_units(a: Buffer, b: Buffer, unit: int, out: Buffer) -> None: ...
