"""Writing bitmaps' data and tables to new clusters, and freeing stored
ones (the storage half of qemu's qcow2-bitmap.c: store_bitmap_data,
free_bitmap_clusters).  engine/bitmap.py's ``Bitmaps.store`` decides what
is written and states the order and its barriers; nothing here syncs.

Many bitmaps are written together: their data and tables are laid out in
one run of new clusters (up to STORE_BATCH bytes at a time) and written
with one pwrite, so 65535 bitmaps cost a few large writes and refcount
updates rather than two of each per bitmap.  Freeing reads every table at
once and frees contiguous runs of clusters together.
"""

from __future__ import annotations

from .._numpy import np

from ..spec import bitmaps as bm
from .bitmap_list import read_tables

# Bytes of new clusters laid out and written at a time (a single bitmap
# larger than this is written on its own).
STORE_BATCH = 32 << 20


def write_bitmaps(state, refcounts, writes):
    """Write each (entry, tracker) of ``writes``: the tracker's non-zero data
    clusters, then its table (cluster-aligned, as qemu), to new clusters;
    sets the entry's ``table_offset`` and ``table_size``.  The clusters
    join the metadata map before guest data could be given them."""
    cs = state.cluster_size
    batch, clusters, pieces = [], 0, []
    for e, t in writes:
        nbytes = bm.data_bytes(t.size, e.granularity_bits)
        n = max(1, -(-nbytes // cs))
        bits = np.frombuffer(t.bits, np.uint8, nbytes)
        if n == 1:                  # the usual case with many bitmaps: no copy
            chunks = bits
            used = np.zeros(int(bits.any()), dtype=np.int64)    # [0]: its one cluster is used
        else:
            if nbytes == n * cs:
                chunks = bits.reshape(n, cs)
            else:
                chunks = np.zeros((n, cs), dtype=np.uint8)
                chunks.reshape(-1)[:nbytes] = bits
            used = np.flatnonzero(chunks.any(axis=1))
        tcl = -(-n * bm.TABLE_ENTRY_SIZE // cs)
        need = len(used) + tcl
        if batch and (clusters + need) * cs > STORE_BATCH:
            _write_batch(state, refcounts, batch, clusters, pieces)
            batch, clusters, pieces = [], 0, []
        batch.append((e, chunks, used, clusters))
        clusters += need
        pieces += [1] * len(used) + [tcl]
    if batch:
        _write_batch(state, refcounts, batch, clusters, pieces)


def _place(refcounts, pieces):
    """Host offset of each cluster of ``pieces`` (runs of clusters: a data
    cluster, a table) allocated in order, each first-fit, as qemu's
    qcow2_alloc_clusters calls place them.  The rest goes in one run as soon
    as it fits at the first free cluster (the same places, one allocation)."""
    cb = refcounts.geo.cluster_bits
    out, rest = [], sum(pieces)
    for k in pieces:
        n = rest if refcounts.find_free_run(rest) == refcounts.next_free(refcounts.free_hint) \
            else k
        base = refcounts.alloc(n)
        out.extend(range(base, base + (n << cb), 1 << cb))
        if n == rest:
            break
        rest -= k
    return np.array(out, dtype=np.int64)


def _write_batch(state, refcounts, batch, clusters, pieces):
    """``clusters`` new clusters: each bitmap's used data clusters, then its
    table, in order; one pwrite per contiguous run of them."""
    cs = state.cluster_size
    where = _place(refcounts, pieces)
    runs = np.flatnonzero(np.diff(where) != cs) + 1
    starts, ends = np.r_[0, runs], np.r_[runs, clusters]
    for a, b in zip(starts.tolist(), ends.tolist()):
        state.metadata.add(int(where[a]) >> state.cluster_bits, b - a)
    buf = np.zeros((clusters, cs), dtype=np.uint8)
    flat = buf.reshape(-1)
    for e, chunks, used, first in batch:
        at = first + len(used)
        if chunks.ndim == 1:        # one data cluster (a table of one entry)
            n = 1
            if len(used):
                flat[first * cs:first * cs + len(chunks)] = chunks
                flat[at * cs:at * cs + 8] = np.frombuffer(
                    int(where[first]).to_bytes(8, "big"), dtype=np.uint8)
        else:
            n = len(chunks)
            buf[first:at] = chunks[used]
            table = np.zeros(n, dtype=">u8")
            table[used] = where[first:first + len(used)]
            raw = table.view(np.uint8)
            flat[at * cs:at * cs + len(raw)] = raw
        e.table_offset, e.table_size = int(where[at]), n
    for a, b in zip(starts.tolist(), ends.tolist()):
        state.file.pwrite(buf[a:b], int(where[a]))
        state.allocated(int(where[b - 1]) + cs)     # fresh space written: reads as written


def free_bitmaps(state, refcounts, entries):
    """Free the tables and data of stored bitmaps no longer in the
    directory on disk.  Tables that do not read clean are left alone
    (never free what is not understood): they leak."""
    cs, cb = state.cluster_size, state.cluster_bits
    entries = [e for e in entries if e.table_offset]
    while entries:
        tables, starts, bad = read_tables(state.file, entries, cs)
        good = entries if bad is None else entries[:bad]
        if bad is not None:
            tables = tables[:starts[bad]]
        offs = bm.table_offsets(tables)
        data = (offs[offs != 0] >> np.uint64(cb)).astype(np.int64)
        table_clusters = [np.arange(e.table_offset >> cb,
                                    ((e.table_offset + e.table_size * bm.TABLE_ENTRY_SIZE - 1)
                                     >> cb) + 1, dtype=np.int64) for e in good]
        _free_clusters(state, refcounts, np.concatenate([data, *table_clusters]))
        entries = [] if bad is None else entries[bad + 1:]


def _free_clusters(state, refcounts, clusters):
    """Drop one reference to each of ``clusters`` (a cluster listed twice
    loses two), contiguous runs together."""
    if not len(clusters):
        return
    c = np.sort(clusters)
    breaks = np.flatnonzero(np.diff(c) != 1) + 1
    firsts = c[np.concatenate([[0], breaks])]
    counts = np.diff(np.concatenate([[0], breaks, [len(c)]]))
    cs = state.cluster_size
    for first, n in zip(firsts.tolist(), counts.tolist()):
        state.metadata.remove(first, n)
        refcounts.free(first * cs, n)
