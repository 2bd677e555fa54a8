"""Expected refcounts: the tally the check builds from the metadata, one
counter per host cluster (qemu's refcount table of qcow2_check_refcounts)."""

import numpy as np

from .._ext.kernels import tally_add

# Where the tally kernel (uint32 counts) saturates.
TALLY_MAX = int(np.iinfo(np.uint32).max)


class RefcountTally:
    """Expected refcounts, one uint32 per host cluster (saturating at
    TALLY_MAX: no real image has a cluster with 4 billion references).

    With ``grow`` (qemu-img check: count whatever the metadata says, like
    qemu's growing refcount array) the array grows to cover every
    reference; otherwise references at or past ``limit`` are recorded in
    ``outside`` (a rebuild refuses them)."""

    def __init__(self, limit, *, grow=False):
        self.counts = np.zeros(max(limit, 1), dtype=np.uint32)
        self.grow = grow
        self.outside = []           # (host cluster, what referenced it)

    def _inside(self, clusters, what):
        """Which of ``clusters`` the array covers (grown to cover them all
        with ``grow``; the others recorded in ``outside``): a slice, or a
        mask."""
        top = int(clusters.max()) + 1
        keep = slice(None)
        if top > len(self.counts):
            if self.grow:
                grown = np.zeros(max(top, 2 * len(self.counts)), dtype=np.uint32)
                grown[:len(self.counts)] = self.counts
                self.counts = grown
            else:
                keep = clusters < len(self.counts)
                self.outside.extend((int(c), what) for c in clusters[~keep][:16])
        return keep

    def add(self, clusters, what=None):
        clusters = np.asarray(clusters, dtype=np.int64).ravel()
        if len(clusters):
            keep = self._inside(clusters, what)
            tally_add(self.counts, np.ascontiguousarray(clusters[keep]))

    def add_range(self, first, n, what=None):
        self.add(np.arange(first, first + n), what)

    def add_weighted(self, clusters, weights, what=None):
        """counts[c] += w (saturating) for each cluster c of weight w."""
        if np.ndim(weights) == 0 and int(weights) == 1:
            return self.add(clusters, what)         # (the kernel: the common case)
        clusters = np.asarray(clusters, dtype=np.int64).ravel()
        if not len(clusters):
            return
        weights = np.broadcast_to(np.asarray(weights, dtype=np.uint64), clusters.shape)
        keep = self._inside(clusters, what)
        u, inv = np.unique(clusters[keep], return_inverse=True)
        total = np.zeros(len(u), dtype=np.uint64)
        np.add.at(total, inv, weights[keep])
        total += self.counts[u]
        self.counts[u] = np.minimum(total, np.uint64(TALLY_MAX)).astype(np.uint32)
