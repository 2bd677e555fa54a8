"""What an open image says about itself: its header's fields, geometry,
caches, modes, backing chain, feature names and cache statistics, read
from the image's state (:class:`~.image.Image` inherits them).  Nothing
here changes the image."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..spec import header as hdr
from . import features

if TYPE_CHECKING:
    from .._ext.cache import TableCache
    from .._ext.fileio import File
    from ..host.raw import RawImage
    from ..spec.geometry import Geometry
    from .image import Image
    from .snapshot import Snapshot


class ImageInfoAPI:
    @property
    def header(self) -> hdr.Header:
        return self.state.header

    @property
    def geo(self) -> Geometry:
        return self.state.geo

    @property
    def file(self) -> File:
        return self.state.file

    @property
    def l2_cache(self) -> TableCache:
        return self.state.l2_cache

    @property
    def refcount_cache(self) -> TableCache:
        return self.state.refcount_cache

    @property
    def snapshot(self) -> Snapshot | None:
        """The internal snapshot this image views (read-only), or None."""
        return self.state.snapshot

    @property
    def cluster_size(self) -> int:
        return self.state.cluster_size

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def refcount_bits(self) -> int:
        return self.header.refcount_bits

    @property
    def compression_type(self) -> str:
        return hdr.COMPRESSION_NAMES[self.header.compression_type]

    @property
    def lazy_refcounts(self) -> bool:
        return self.state.lazy_refcounts

    @property
    def writethrough(self) -> bool:
        return self.state.writethrough

    @property
    def dirty(self) -> bool:
        return features.is_dirty(self.state)

    @property
    def corrupt(self) -> bool:
        return bool(self.header.incompatible_features & hdr.INCOMPAT_CORRUPT)

    @property
    def backing_file(self) -> str | None:
        return self.header.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.header.backing_format

    @property
    def backing_chain(self) -> list[str]:
        img: Image | RawImage | None
        chain, img = [], self
        while img is not None:
            chain.append(img.path)
            img = getattr(img, "backing", None)
        return chain

    @property
    def features(self) -> dict[str, list[str]]:
        h = self.header
        out = {}
        for kind, name, bits in (("incompatible", hdr.FEATURE_INCOMPAT, h.incompatible_features),
                                 ("compatible", hdr.FEATURE_COMPAT, h.compatible_features),
                                 ("autoclear", hdr.FEATURE_AUTOCLEAR, h.autoclear_features)):
            out[kind] = [h.feature_name(name, b) for b in range(64) if bits >> b & 1]
        return out

    @property
    def cache_stats(self) -> dict[str, int]:
        """Metadata cache statistics; with a backing chain, also the chain's
        (engine/chain.py, Chain.stats: its resolved map's size and hits)."""
        l2, rc = self.l2_cache, self.refcount_cache
        out = {"l2_hits": l2.hits, "l2_misses": l2.misses, "l2_slots": l2.nslots,
               "l2_used": l2.used, "refcount_hits": rc.hits, "refcount_misses": rc.misses,
               "refcount_used": rc.used}
        if self.chain is not None:
            out.update(self.chain.stats())
        return out
