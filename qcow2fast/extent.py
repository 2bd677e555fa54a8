"""Typed extents returned by ``Image.block_status``."""

from collections.abc import Iterable
from typing import NamedTuple, Optional

from .spec.constants import Kind

_COMPRESSED = Kind.COMPRESSED.label


class Extent(NamedTuple):
    offset: int                  # guest offset
    length: int
    kind: str                    # a Kind's label (spec.constants.EXTENT_KINDS): "data" |
                                 # "zero" | "unallocated" | "compressed"
    host_offset: Optional[int]   # offset in the file of the layer at ``depth`` (data,
                                 # compressed, and zero clusters that are preallocated)
    depth: int                   # 0 = this image, 1 = its backing file, ...


def merge_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Merge neighbours of the same kind and depth (and contiguous host
    offsets for data)."""
    out: list[Extent] = []
    for e in extents:
        if e.length == 0:
            continue
        if out:
            p = out[-1]
            if (p.kind == e.kind and p.depth == e.depth and p.offset + p.length == e.offset
                    and e.kind != _COMPRESSED
                    and (p.host_offset is None) == (e.host_offset is None)
                    and (p.host_offset is None or p.host_offset + p.length == e.host_offset)):
                out[-1] = p._replace(length=p.length + e.length)
                continue
        out.append(e)
    return out
