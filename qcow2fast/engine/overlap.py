"""Which host clusters hold metadata (qemu's overlap check).

Before guest data is written to a host cluster, that cluster must not hold
the header, an L1/L2 table, the refcount table or a refcount block, or the
snapshot table: a data write there would destroy the image.  Finding such a
pointer while writing means the image is corrupt.

The map is a packed bitmap (bit c & 7 of byte c >> 3 is host cluster c),
tested by ``ImageState.touches_metadata`` in the C write path: one bit per cluster, 2 MiB for a
1 TiB image of 64 KiB clusters.
"""

import numpy as np


class MetadataMap:
    def __init__(self, nclusters, on_resize=None):
        self.bits = np.zeros(max((nclusters + 7) >> 3, 8), dtype=np.uint8)
        self.on_resize = on_resize      # called with the array now and whenever it moves
        if on_resize is not None:
            on_resize(self.bits)

    def _grow(self, end):
        need = (end + 7) >> 3
        if need > len(self.bits):
            new = np.zeros(max(need, 2 * len(self.bits)), dtype=np.uint8)
            new[:len(self.bits)] = self.bits
            self.bits = new
            if self.on_resize is not None:
                self.on_resize(new)

    def _mask(self, cluster, n):
        idx = np.arange(cluster, cluster + n)
        return idx >> 3, (np.uint8(1) << (idx & 7).astype(np.uint8))

    def add(self, cluster, n=1):
        self._grow(cluster + n)
        byte, bit = self._mask(cluster, n)
        np.bitwise_or.at(self.bits, byte, bit)

    def remove(self, cluster, n=1):
        byte, bit = self._mask(cluster, n)
        ok = byte < len(self.bits)
        np.bitwise_and.at(self.bits, byte[ok], ~bit[ok])

    def add_clusters(self, clusters):
        """Mark each of ``clusters`` (an integer array), one at a time."""
        clusters = np.asarray(clusters, dtype=np.int64)
        if len(clusters):
            self._grow(int(clusters.max()) + 1)
            np.bitwise_or.at(self.bits, clusters >> 3,
                             np.uint8(1) << (clusters & 7).astype(np.uint8))
