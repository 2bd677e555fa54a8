"""Which host clusters hold metadata (qemu's overlap check).

Before guest data is written to a host cluster, that cluster must not hold
the header, an L1/L2 table, the refcount table or a refcount block, or the
snapshot table: a data write there would destroy the image.  Finding such a
pointer while writing means the image is corrupt.
"""

import numpy as np


class MetadataMap:
    """A bitmap over host clusters: 1 where metadata lives."""

    def __init__(self, nclusters):
        self.bits = np.zeros(max(nclusters, 1), dtype=np.uint8)

    def _grow(self, end):
        if end > len(self.bits):
            new = np.zeros(max(end, 2 * len(self.bits)), dtype=np.uint8)
            new[:len(self.bits)] = self.bits
            self.bits = new

    def add(self, cluster, n=1):
        self._grow(cluster + n)
        self.bits[cluster:cluster + n] = 1

    def remove(self, cluster, n=1):
        self.bits[cluster:cluster + n] = 0

    def overlaps(self, cluster, n=1):
        """True if any of host clusters [cluster, cluster+n) holds metadata."""
        return bool(self.bits[cluster:cluster + n].any())
