"""The spec's constants and kinds, for Python code.

The values are declared once, in ``csrc/qcow2_spec.h`` (with their meaning);
the kernels cimport them from ``_ext/common.pxd`` and
``qcow2fast._ext.spec`` exports the same values, which this module
re-exports under the same names.  Every Python module takes them from here.
"""

import enum
import struct

from .._ext.spec import (EXT_COMPRESSED, EXT_DATA, EXT_INVALID, EXT_UNALLOCATED, EXT_ZERO,
                         L1E_OFFSET_MASK, L1E_RESERVED_MASK, L1E_SIZE, L2E_OFFSET_MASK,
                         L2E_SIZE_EXTENDED, L2E_SIZE_NORMAL, L2E_STD_RESERVED_MASK,
                         QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO,
                         REFT_OFFSET_MASK, REFT_RESERVED_MASK, REFTABLE_ENTRY_SIZE,
                         SC_ALLOC_MASK, SC_BITS, SC_ZERO_SHIFT, SUBCLUSTERS, coffset_mask,
                         csize_mask, csize_shift, l2_bits, rb_bits, unit_bits)

__all__ = [
    "QCOW_OFLAG_COPIED", "QCOW_OFLAG_COMPRESSED", "QCOW_OFLAG_ZERO", "L1E_OFFSET_MASK",
    "L2E_OFFSET_MASK", "REFT_OFFSET_MASK", "L1E_RESERVED_MASK", "L2E_STD_RESERVED_MASK",
    "REFT_RESERVED_MASK", "L1E_SIZE", "L2E_SIZE_NORMAL", "L2E_SIZE_EXTENDED",
    "REFTABLE_ENTRY_SIZE", "SC_BITS", "SUBCLUSTERS", "SC_ALLOC_MASK", "SC_ZERO_SHIFT",
    "Kind", "UNALLOCATED", "DATA", "ZERO", "COMPRESSED", "INVALID", "KIND_NAMES",
    "EXTENT_KINDS", "BE64", "l2_bits", "unit_bits", "rb_bits", "csize_shift", "csize_mask",
    "coffset_mask",
]


class Kind(enum.IntEnum):
    """What an allocation unit (cluster or subcluster) of one layer is: the
    kernels' EXT_* values."""

    UNALLOCATED = EXT_UNALLOCATED
    DATA = EXT_DATA
    ZERO = EXT_ZERO              # reads as zeros (a host offset may be set)
    COMPRESSED = EXT_COMPRESSED
    INVALID = EXT_INVALID        # a malformed entry: reported, never an extent's kind

    @property
    def label(self):
        """The public name of the kind: ``Extent.kind``."""
        return self.name.lower()


# The kinds as plain ints, for hot paths and numpy arrays of kinds.
UNALLOCATED = int(Kind.UNALLOCATED)
DATA = int(Kind.DATA)
ZERO = int(Kind.ZERO)
COMPRESSED = int(Kind.COMPRESSED)
INVALID = int(Kind.INVALID)

# kind -> public name ("unallocated", "data", "zero", "compressed").
KIND_NAMES = {int(k): k.label for k in Kind if k is not Kind.INVALID}
EXTENT_KINDS = tuple(KIND_NAMES.values())

# One on-disk table entry (L1, L2 word, refcount table): big-endian u64.
BE64 = struct.Struct(">Q")

# qemu's block layer unit (BDRV_SECTOR_SIZE): sizes round to it.
SECTOR = 512


def whole_sectors(nbytes):
    """A size as qemu's block layer has it: whole sectors, rounded up (a
    raw file's tail reads as zeros up to the sector's end)."""
    return -(-nbytes // SECTOR) * SECTOR
