"""Who references a host cluster: the header, a table, or an L2 entry (with
the guest offset it maps).  check uses it to say, under each leak and
corruption it reports, what points at the cluster.

One pass over the metadata, looking only for the clusters asked about, so
its cost is paid only when check found something."""

import numpy as np

from ..errors import Qcow2Error
from ..spec.constants import L1E_SIZE
from ..spec.entries import (decode_table, host_offsets, is_compressed, l2_table_offsets,
                            refblock_offsets)
from ..spec.geometry import Geometry
from ..spec.header import INCOMPAT_EXTL2
from ..engine.crypto import header_ranges as crypto_header_ranges
from ..engine.bitmap_list import referenced_ranges
from ..engine.snapshot import read_snapshot_table

MAX_PER_CLUSTER = 4


class _Finder:
    def __init__(self, clusters):
        self.want = np.array(sorted(clusters), dtype=np.int64)
        self.refs = {c: [] for c in clusters}

    def note(self, indices, describe):
        """Record ``describe(i)`` for every position i of ``indices`` (host
        cluster numbers) that is a cluster asked about."""
        indices = np.asarray(indices, dtype=np.int64)
        hits = np.nonzero(np.isin(indices, self.want))[0]
        # the first MAX_PER_CLUSTER hits of each cluster only (a hostile
        # table can point millions of entries at one cluster)
        order, rank = repeat_ranks(indices[hits])
        for i in np.sort(hits[order[rank < MAX_PER_CLUSTER]]):
            found = self.refs[int(indices[i])]
            if len(found) < MAX_PER_CLUSTER:
                found.append(describe(int(i)))


def repeat_ranks(values):
    """(order, rank): ``order`` sorts ``values`` (stably); ``rank[k]`` is how
    many earlier values equal ``values[order[k]]``."""
    order = np.argsort(values, kind="stable")
    sv = values[order]
    pos = np.arange(len(sv))
    starts = np.where(np.r_[True, sv[1:] != sv[:-1]], pos, 0) if len(sv) else pos
    return order, pos - np.maximum.accumulate(starts) if len(sv) else pos


def _table(f, offset, nbytes, file_size):
    if not nbytes or offset + nbytes > file_size:
        return np.zeros(0, dtype=np.uint64)
    return decode_table(f.pread(offset, nbytes))


def _span(offset, nbytes, cb):
    return np.arange(offset >> cb, ((offset + max(nbytes, 1) - 1) >> cb) + 1)


def find_references(f, h, clusters):
    """{cluster: [description, ...]} for the host ``clusters`` of the image
    in file ``f`` with header ``h`` (at most a few descriptions each)."""
    geo = Geometry(h.cluster_bits, h.refcount_order,
                   extended_l2=h.incompatible_features & INCOMPAT_EXTL2)
    cs, cb = geo.cluster_size, geo.cluster_bits
    size = f.size()
    fd = _Finder(clusters)
    fd.note([0], lambda i: "the image header")
    fd.note(_span(h.refcount_table_offset, h.refcount_table_clusters * cs, cb),
            lambda i: "the refcount table")
    table = _table(f, h.refcount_table_offset, h.refcount_table_clusters * cs, size)
    blocks = refblock_offsets(table)
    nz = np.nonzero(blocks)[0]
    fd.note(blocks[nz] >> np.uint64(cb), lambda i: f"refcount table entry {nz[i]} "
                                                   "(a refcount block)")
    for off, n, what in referenced_ranges(f, h, h.size)[0] + crypto_header_ranges(h):
        fd.note(_span(off, n, cb), lambda i, what=what: what)
    l1s = [("the active L1 table", h.l1_table_offset, h.l1_size)]
    try:
        snapshots, table_bytes = read_snapshot_table(f, h)
    except Qcow2Error:
        snapshots, table_bytes = [], 0
    if snapshots:
        fd.note(_span(h.snapshots_offset, table_bytes, cb), lambda i: "the snapshot table")
    l1s += [(f"the L1 table of snapshot {s.id} ({s.name})", s.l1_table_offset, s.l1_size)
            for s in snapshots]
    seen = set()
    budget = size // L1E_SIZE       # as check: L1 tables that fit in the file, no more
    for name, l1_off, l1_size in l1s:
        if not l1_size or l1_size > budget:
            continue
        budget -= l1_size
        fd.note(_span(l1_off, l1_size * L1E_SIZE, cb), lambda i, name=name: name)
        l2offs = l2_table_offsets(_table(f, l1_off, l1_size * L1E_SIZE, size))
        idx = np.nonzero(l2offs)[0]
        fd.note(l2offs[idx] >> np.uint64(cb),
                lambda i, name=name, idx=idx: f"entry {idx[i]} of {name} (an L2 table)")
        for l1i in idx:
            l2off = int(l2offs[l1i])
            if l2off in seen:       # a table met again adds only guest offsets
                continue
            seen.add(l2off)
            l2 = _table(f, l2off, cs, size)[::geo.l2_entry_words]     # descriptors
            if not len(l2):
                continue
            base = int(l1i) << geo.l2_bits

            def where(j, l2off=l2off, base=base):
                guest = (base + int(j)) << cb
                return f"entry {j} of the L2 table at {l2off:#x} (guest offset {guest:#x})"

            comp = is_compressed(l2)
            data = np.nonzero(~comp & (host_offsets(l2) != 0))[0]
            fd.note(host_offsets(l2[data]) >> np.uint64(cb),
                    lambda i, data=data, where=where: where(data[i]))
            for j in np.nonzero(comp)[0]:
                first, last = geo.compressed_clusters(int(l2[j]))
                fd.note(np.arange(first, last + 1),
                        lambda i, j=j, where=where: where(j) + ", compressed")
    return fd.refs


def describe(cluster, cluster_bits, refs):
    """The detail line check prints under a leak or corruption."""
    found = "; ".join(refs) if refs else "nothing"
    return f"    host offset {cluster << cluster_bits:#x}: referenced by {found}"
