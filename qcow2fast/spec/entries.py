"""L1, L2 and refcount table entries as numpy arrays: the spec's entry bits
(:mod:`qcow2fast.spec.constants`) applied to whole tables at a time, for
the code that reads metadata in bulk (check, rebuild, references).

Tables are decoded from their on-disk (big-endian) form into native uint64
arrays with :func:`decode_table`; every other helper takes such an array
(of L2 entries: the descriptor words) and returns an array of the same
length.  The L1 and refcount-table helpers also take the engine's
``array('Q')`` tables (viewed, not copied).
"""

from .._numpy import np
from . import tables
from .constants import (L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK,
                        L2E_STD_RESERVED_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
                        QCOW_OFLAG_ZERO,
                        REFT_OFFSET_MASK, SC_ALLOC_MASK, SC_ZERO_SHIFT)


def decode_table(raw):
    """A table in its on-disk form (bytes) as a native uint64 array."""
    return np.asarray(tables.decode_table(raw))


# -- L1 entries ------------------------------------------------------------------------

def l2_table_offsets(l1):
    """The L2 table offset of each L1 entry (0: none)."""
    return np.asarray(l1) & L1E_OFFSET_MASK


def l1_reserved(l1):
    """Which L1 entries have reserved bits set."""
    return (np.asarray(l1) & L1E_RESERVED_MASK) != 0


# -- L2 entries (standard, or the descriptor word of extended ones) ---------------------

def is_compressed(l2):
    return (l2 & QCOW_OFLAG_COMPRESSED) != 0


def host_offsets(l2):
    """The host offset bits of standard entries (meaningless for compressed ones)."""
    return l2 & L2E_OFFSET_MASK


def standard_allocated(l2):
    """Which entries are standard (not compressed) with a host cluster."""
    return ~is_compressed(l2) & (host_offsets(l2) != 0)


def at_host0(l2):
    """Which entries map host offset 0 when the image has an external data
    file (COPIED with an empty offset, not zero or compressed: qemu's
    qcow2_get_cluster_type)."""
    mask = QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO | L2E_OFFSET_MASK
    return (l2 & mask) == QCOW_OFLAG_COPIED


def l2_reserved(l2):
    """Which standard entries have reserved bits set (compressed entries have
    none: the mask does not apply to them)."""
    return ~is_compressed(l2) & ((l2 & L2E_STD_RESERVED_MASK) != 0)


def has_copied(entries):
    """Which L1 or L2 entries carry QCOW_OFLAG_COPIED."""
    return (np.asarray(entries) & QCOW_OFLAG_COPIED) != 0


# -- extended L2 entries: the subcluster bitmap word ----------------------------------

def sc_alloc_bits(bitmaps):
    """The allocated-subcluster bits of each bitmap word."""
    return bitmaps & SC_ALLOC_MASK


def sc_zero_bits(bitmaps):
    """The reads-as-zero subcluster bits of each bitmap word (shifted down)."""
    return bitmaps >> SC_ZERO_SHIFT


# -- refcount table entries ----------------------------------------------------------

def refblock_offsets(table):
    """The refcount block offset of each refcount table entry (0: none)."""
    return np.asarray(table) & REFT_OFFSET_MASK
