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
    batch, clusters = [], 0
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
        need = len(used) + -(-n * bm.TABLE_ENTRY_SIZE // cs)
        if batch and (clusters + need) * cs > STORE_BATCH:
            _write_batch(state, refcounts, batch, clusters)
            batch, clusters = [], 0
        batch.append((e, chunks, used, clusters))
        clusters += need
    if batch:
        _write_batch(state, refcounts, batch, clusters)


def _write_batch(state, refcounts, batch, clusters):
    """One run of ``clusters`` new clusters: each bitmap's used data
    clusters, then its table, in order; one pwrite."""
    cs = state.cluster_size
    base = refcounts.alloc(clusters)
    state.metadata.add(base >> state.cluster_bits, clusters)
    buf = np.zeros((clusters, cs), dtype=np.uint8)
    flat = buf.reshape(-1)
    for e, chunks, used, first in batch:
        at = first + len(used)
        if chunks.ndim == 1:        # one data cluster (a table of one entry)
            n = 1
            if len(used):
                flat[first * cs:first * cs + len(chunks)] = chunks
                flat[at * cs:at * cs + 8] = np.frombuffer(
                    (base + first * cs).to_bytes(8, "big"), dtype=np.uint8)
        else:
            n = len(chunks)
            buf[first:at] = chunks[used]
            table = np.zeros(n, dtype=">u8")
            table[used] = base + (first + np.arange(len(used), dtype=np.int64)) * cs
            raw = table.view(np.uint8)
            flat[at * cs:at * cs + len(raw)] = raw
        e.table_offset, e.table_size = base + at * cs, n
    state.file.pwrite(buf, base)
    state.allocated(base + clusters * cs)     # fresh space written: no longer reads as zeros


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
