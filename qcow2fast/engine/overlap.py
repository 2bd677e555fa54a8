"""Which host clusters hold metadata (qemu's overlap check).

Before guest data is written to a host cluster, that cluster must not hold
the header, an L1/L2 table, the refcount table or a refcount block, or the
snapshot table: a data write there would destroy the image.  Finding such a
pointer while writing means the image is corrupt.

The map is a packed bitmap in a ``bytearray`` (bit c & 7 of byte c >> 3 is
host cluster c), tested by ``ImageState.touches_metadata`` in the C write
path: one bit per cluster, 2 MiB for a 1 TiB image of 64 KiB clusters.
It is never resized in place (the state holds a pointer into it): growing
makes a new one and hands it to ``on_resize``.
"""

from array import array

from .._ext import kernels


class MetadataMap:
    def __init__(self, nclusters, on_resize=None):
        self.bits = bytearray(max((nclusters + 7) >> 3, 8))
        self.on_resize = on_resize      # called with the buffer now and whenever it moves
        if on_resize is not None:
            on_resize(self.bits)

    def _grow(self, end):
        need = (end + 7) >> 3
        if need > len(self.bits):
            new = bytearray(max(need, 2 * len(self.bits)))
            new[:len(self.bits)] = self.bits
            self.bits = new
            if self.on_resize is not None:
                self.on_resize(new)

    def add(self, cluster, n=1):
        self._grow(cluster + n)
        kernels.bits_set(self.bits, cluster, n)

    def add_table(self, table, offset_mask, cluster_bits):
        """Mark the cluster of each set offset (``entry & offset_mask``) of
        a native uint64 table (an L1 or refcount table: up to millions of
        entries, one C pass)."""
        top = kernels.bits_set_table(self.bits, table, offset_mask, cluster_bits)
        if top > 8 * len(self.bits):
            self._grow(top)
            kernels.bits_set_table(self.bits, table, offset_mask, cluster_bits)

    def add_each(self, clusters):
        """Mark every host cluster of ``clusters``: a numpy integer array
        (from code that already works in numpy) or any iterable of ints."""
        if getattr(clusters, "dtype", None) is not None:
            clusters = clusters.astype("int64").ravel()
            top = int(clusters.max()) + 1 if len(clusters) else 0
        else:
            clusters = array("q", clusters)
            top = max(clusters) + 1 if clusters else 0
        if top:
            self._grow(top)
            kernels.bits_set_each(self.bits, clusters)

    add_clusters = add_each

    def remove(self, cluster, n=1):
        kernels.bits_set(self.bits, cluster, n, False)
