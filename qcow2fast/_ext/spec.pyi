from typing import Final

QCOW_OFLAG_COPIED: Final[int]
QCOW_OFLAG_COMPRESSED: Final[int]
QCOW_OFLAG_ZERO: Final[int]
L1E_OFFSET_MASK: Final[int]
L2E_OFFSET_MASK: Final[int]
REFT_OFFSET_MASK: Final[int]
L1E_RESERVED_MASK: Final[int]
L2E_STD_RESERVED_MASK: Final[int]
REFT_RESERVED_MASK: Final[int]
L1E_SIZE: Final[int]
L2E_SIZE_NORMAL: Final[int]
L2E_SIZE_EXTENDED: Final[int]
REFTABLE_ENTRY_SIZE: Final[int]
SC_BITS: Final[int]
SUBCLUSTERS: Final[int]
SC_ALLOC_MASK: Final[int]
SC_ZERO_SHIFT: Final[int]
EXT_UNALLOCATED: Final[int]
EXT_DATA: Final[int]
EXT_ZERO: Final[int]
EXT_COMPRESSED: Final[int]
EXT_INVALID: Final[int]

def l2_bits(cluster_bits: int, extended_l2: bool) -> int: ...
def unit_bits(cluster_bits: int, extended_l2: bool) -> int: ...
def rb_bits(cluster_bits: int, refcount_order: int) -> int: ...
def csize_shift(cluster_bits: int) -> int: ...
def csize_mask(cluster_bits: int) -> int: ...
def coffset_mask(cluster_bits: int) -> int: ...
