"""The refcounts as the image stores them, beside the ones its metadata
implies (the comparing half of qemu's qcow2_check_refcounts:
compare_refcounts), for :mod:`qcow2fast.fsck.check`.
"""

import numpy as np

from .._ext.kernels import refcount_decode
from ..spec.constants import REFT_OFFSET_MASK


def last_true(mask):
    """Index of the last True of a bool array, -1 if none."""
    return len(mask) - 1 - int(np.argmax(mask[::-1])) if mask.any() else -1


class StoredRefcounts:
    """The stored refcount of clusters [0, n), kept as the expected ones
    (the tally) plus the clusters where they differ, so that no array of
    the image's size is built beside the tally.  ``values``: cluster ->
    stored refcount where it differs from the expected one; ``bad``: the
    refcount table indices whose block cannot be read (qemu's get_refcount
    fails with -EIO), each covering ``per_block`` clusters."""

    def __init__(self, expected, per_block, values=None, bad=()):
        self.expected, self.per_block = expected, per_block
        self.values, self.bad = dict(values or {}), frozenset(bad)

    def with_values(self, values):
        """A copy with some clusters' refcounts replaced (a repair's fixes)."""
        out = StoredRefcounts(self.expected, self.per_block, self.values, self.bad)
        out.values.update(values)
        return out

    def _arrays(self):
        """The differing clusters and their stored refcounts, by cluster."""
        n = len(self.values)
        keys = np.fromiter(self.values, np.int64, n)
        order = np.argsort(keys)
        return keys[order], np.fromiter(self.values.values(), np.uint64, n)[order]

    def _patch(self, idx, out):
        """Write the differing values of the clusters ``idx`` into ``out``."""
        if self.values:
            keys, vals = self._arrays()
            pos = np.minimum(np.searchsorted(keys, idx), len(keys) - 1)
            hit = keys[pos] == idx
            out[hit] = vals[pos[hit]]

    def get(self, idx):
        """(refcounts, readable) of the clusters ``idx`` (0 past the end)."""
        idx = np.asarray(idx, dtype=np.int64)
        ok = idx < len(self.expected)
        out = np.zeros(len(idx), dtype=np.uint64)
        out[ok] = self.expected[idx[ok]]
        self._patch(idx, out)
        readable = np.ones(len(idx), dtype=bool)
        if self.bad:    # (np.isin of nothing would still load numpy.ma, ~15 ms)
            readable = ~np.isin(idx // self.per_block, list(self.bad)) | ~ok
        return out, readable

    def state(self):
        """Per cluster: 1 refcount 1, 2 unreadable, 0 otherwise (uint8)."""
        n = len(self.expected)
        st = np.empty(n, dtype=np.uint8)
        np.equal(self.expected, 1, out=st.view(bool))
        keys, vals = self._arrays()
        st[keys] = vals == 1
        for t in self.bad:
            st[t * self.per_block:(t + 1) * self.per_block] = 2
        return st


def compare_refcounts(f, file_size, geo, table, expected):
    """qemu's compare_refcounts, a refcount block at a time, for the image
    file ``f`` (of ``file_size`` bytes): returns (the StoredRefcounts, the clusters whose stored
    refcount differs from ``expected`` or cannot be read, 1 + the last
    cluster in use: with a nonzero refcount, stored or expected, and
    readable)."""
    n, cs = len(expected), geo.cluster_size
    E = geo.rb_entries
    block = np.zeros(E, dtype=np.uint64)
    values, bad, mismatch, end = {}, [], [], 0
    for t in range(-(-n // E)):
        lo, hi = t * E, min(n, (t + 1) * E)
        want = expected[lo:hi]
        off = int(table[t]) & REFT_OFFSET_MASK if t < len(table) else 0  # reserved bits ignored
        if off & (cs - 1):
            bad.append(t)
            mismatch.append(np.arange(lo, hi))
            continue
        if off:
            raw = bytes(f.pread(off, cs)) if off < file_size else b""
            refcount_decode(raw.ljust(cs, b"\0"), geo.refcount_order, block)
            have = block[:hi - lo]
        else:
            have = np.zeros(hi - lo, dtype=np.uint64)
        last = last_true((have > 0) | (want > 0))
        if last >= 0:
            end = lo + last + 1
        diff = np.flatnonzero(have != want)
        if len(diff):
            values.update(zip((diff + lo).tolist(), have[diff].tolist()))
            mismatch.append(diff + lo)
    mismatch = np.concatenate(mismatch) if mismatch else np.zeros(0, np.int64)
    return StoredRefcounts(expected, E, values, bad), mismatch, end
