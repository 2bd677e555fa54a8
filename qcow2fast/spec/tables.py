"""Tables of 64-bit big-endian entries (L1, refcount table, L2 slices)
between their on-disk form and native ``array('Q')`` -- without numpy, so
that opening an image does not load it.  ``numpy.asarray`` of such an
array is a zero-copy view for code that works on whole tables."""

import sys
from array import array

_SWAP = sys.byteorder == "little"
ALL_BITS = (1 << 64) - 1        # every bit of a 64-bit entry (masks; "any bit set")


def decode_table(raw):
    """``raw`` (bytes of big-endian 64-bit entries) as a native ``array('Q')``."""
    table = array("Q")
    table.frombytes(raw)
    if _SWAP:
        table.byteswap()
    return table


def encode_table(table):
    """A native table of 64-bit entries (anything ``array('Q', ...)`` takes)
    in its on-disk form, as bytes."""
    out = array("Q", table)
    if _SWAP:
        out.byteswap()
    return out.tobytes()
