"""Writing a new qcow2 image in one pass: data clusters appended in guest
order, then every metadata structure computed in bulk (numpy).

The same layout code serves a seekable file and a stream (stdout):

- file:   header | data ... | L2 tables | L1 | refcount table | refcount blocks
          (the header cluster is written last: until then cluster 0 is zeros,
          so an interrupted file never looks like a valid image)
- stream: header | L1 | refcount table | refcount blocks | L2 tables | data ...
          (the data was spooled first, so its size is known when the header
          goes out; see docs/convert.md)

Data placement follows qemu: an uncompressed cluster is cluster aligned; a
compressed cluster is packed at byte granularity after the previous one
(qemu's qcow2_alloc_bytes), described by the spec's compressed cluster
descriptor, and a host cluster is never shared by more compressed clusters
than the refcount width can count.
"""

import mmap
import os
import shutil
import time

import numpy as np

from ..spec import header as hdr
from .._ext.kernels import refcount_encode
from ..errors import InvalidArgumentError
from ..spec.constants import (COMPRESSED, DATA, L1E_SIZE, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO,
                              REFTABLE_ENTRY_SIZE, UNALLOCATED, ZERO)
from .._ext.fileio import pwrite_buffers
from ..host.file import is_device, prefault_for, pwrite_all, set_size, write_error


class DataPacker:
    """Places data clusters in the data region (offsets relative to its
    start, which is cluster aligned in the final file)."""

    def __init__(self, geo):
        self.cs = geo.cluster_size
        self.refcount_max = geo.refcount_max
        self.pos = 0            # next free byte
        self.cur_refs = 0       # references to the host cluster holding ``pos``

    def place(self, n, compressed):
        """(relative offset, padding bytes to write before it) for ``n`` bytes."""
        cs, pos = self.cs, self.pos
        aligned = -(-pos // cs) * cs
        if not compressed or (pos % cs and self.cur_refs >= self.refcount_max):
            start = aligned
        else:
            start = pos
        end = start + n
        if compressed:
            # Invariant: a compressed cluster is shorter than a cluster, so it
            # touches at most two host clusters.
            if start // cs != (end - 1) // cs:
                self.cur_refs = 1
            else:
                self.cur_refs = 1 if start % cs == 0 else self.cur_refs + 1
        else:
            self.cur_refs = 1
        if end % cs == 0:
            self.cur_refs = 0
        self.pos = end
        return start, start - pos


class ClusterTable:
    """What each guest cluster of the output is: kind, relative data offset
    and compressed length, collected batch by batch (batches with nothing
    in them may be missing: those clusters are unallocated)."""

    def __init__(self):
        self.parts = []

    def add(self, first, kinds, rel, clen):
        self.parts.append((first, np.asarray(kinds, np.uint8), np.asarray(rel, np.uint64),
                           np.asarray(clen, np.uint32)))

    def arrays(self, n):
        """(kinds, rel, clen) for ``n`` guest clusters."""
        kinds = np.full(n, UNALLOCATED, np.uint8)
        rel, clen = np.zeros(n, np.uint64), np.zeros(n, np.uint32)
        for first, k, r, c in self.parts:
            m = min(len(k), n - first)
            if m > 0:
                kinds[first:first + m], rel[first:first + m] = k[:m], r[:m]
                clen[first:first + m] = c[:m]
        return kinds, rel, clen.astype(np.uint64)


def _clusters(nbytes, cs):
    return -(-nbytes // cs)


def build_metadata(settings, size, table, data_len, *, stream):
    """Lay out the image.  Returns (data_base, pieces, file_end): ``pieces``
    is a list of (file offset, bytes) in file order, the header first."""
    geo = settings.geometry()
    cs, cb = geo.cluster_size, geo.cluster_bits
    n_guest = _clusters(size, cs)
    kinds, rel, clen = table.arrays(n_guest)
    l1_size = geo.l1_size_for(size)
    if l1_size > hdr.MAX_L1_BYTES // L1E_SIZE:
        raise InvalidArgumentError(f"size {size} is too large for cluster_size {cs}")
    per_l2 = geo.l2_entries
    padded = np.full(l1_size * per_l2, UNALLOCATED, np.uint8)
    padded[:n_guest] = kinds
    used = np.flatnonzero((padded != UNALLOCATED).reshape(l1_size, per_l2).any(axis=1)) \
        if l1_size else np.zeros(0, np.int64)
    n_l2 = len(used)
    l1_clusters = _clusters(l1_size * L1E_SIZE, cs)   # none for an empty disk (l1_size 0)
    data_clusters = _clusters(data_len, cs)
    fixed = 1 + data_clusters + n_l2 + l1_clusters
    n_rb, rt_clusters = geo.refcount_layout(fixed)
    if rt_clusters * cs > hdr.MAX_REFTABLE_BYTES:
        raise InvalidArgumentError("image too large for a refcount table with these "
                                   "cluster_size/refcount_bits")
    meta = l1_clusters + rt_clusters + n_rb + n_l2
    if stream:
        l1_off = cs
        rt_off = l1_off + l1_clusters * cs
        rb_off = rt_off + rt_clusters * cs
        l2_off = rb_off + n_rb * cs
        data_base = l2_off + n_l2 * cs
        file_end = data_base + data_clusters * cs
    else:
        data_base = cs
        l2_off = data_base + data_clusters * cs
        l1_off = l2_off + n_l2 * cs
        rt_off = l1_off + l1_clusters * cs
        rb_off = rt_off + rt_clusters * cs
        file_end = rb_off + n_rb * cs
    total_clusters = file_end // cs
    assert total_clusters == 1 + data_clusters + meta

    # L2 entries.
    host = rel + np.uint64(data_base)
    entries = np.zeros(l1_size * per_l2, np.uint64)
    e = entries[:n_guest]
    is_data, is_comp = kinds == DATA, kinds == COMPRESSED
    e[is_data] = host[is_data] | np.uint64(QCOW_OFLAG_COPIED)
    ch, cl = host[is_comp], clen[is_comp]
    e[is_comp] = geo.compressed_descriptor(ch, cl)
    e[kinds == ZERO] = QCOW_OFLAG_ZERO
    l2_tables = entries.reshape(l1_size, per_l2)[used]
    l1 = np.zeros(l1_clusters * cs // L1E_SIZE, np.uint64)
    l1[used] = (np.arange(n_l2, dtype=np.uint64) * np.uint64(cs) + np.uint64(l2_off)) \
        | np.uint64(QCOW_OFLAG_COPIED)

    # Refcounts: 1 for the header and each metadata cluster; data clusters
    # counted from the L2 entries (a compressed cluster references every
    # host cluster it touches).
    refs = np.zeros(n_rb * geo.rb_entries, np.uint64)
    refs[:total_clusters] = 1
    data_first = data_base >> cb
    refs[data_first:data_first + data_clusters] = 0
    touched = [host[is_data] >> np.uint64(cb), ch >> np.uint64(cb)]
    last = (ch + cl - np.uint64(1)) >> np.uint64(cb)
    touched.append(last[last != (ch >> np.uint64(cb))])
    counts = np.bincount(np.concatenate(touched).astype(np.int64), minlength=len(refs))
    refs += counts[:len(refs)].astype(np.uint64)
    assert int(refs.max(initial=0)) <= geo.refcount_max
    reftable = np.zeros(rt_clusters * cs // REFTABLE_ENTRY_SIZE, np.uint64)
    reftable[:n_rb] = np.arange(n_rb, dtype=np.uint64) * np.uint64(cs) + np.uint64(rb_off)
    blocks = np.zeros(n_rb * cs, np.uint8)
    for i in range(n_rb):
        refcount_encode(refs[i * geo.rb_entries:(i + 1) * geo.rb_entries],
                        geo.refcount_order, blocks[i * cs:(i + 1) * cs])

    h = settings.header(size=size, l1_size=l1_size, l1_table_offset=l1_off,
                        refcount_table_offset=rt_off, refcount_table_clusters=rt_clusters)
    pieces = [(0, h.pack().ljust(cs, b"\0")),
              (l1_off, l1.astype(">u8").tobytes()),
              (rt_off, reftable.astype(">u8").tobytes()),
              (rb_off, blocks.tobytes()),
              (l2_off, l2_tables.astype(">u8").tobytes())]
    pieces.sort()
    return data_base, pieces, file_end


class Qcow2Writer:
    """Appends data clusters and finishes the image (see the module doc).

    ``fd`` is the output: a seekable file written in place, or (``stream``)
    a pipe, with the data spooled in ``spool_dir`` until the end.  With
    ``direct`` (a fileio.File of the same file opened with O_DIRECT), the
    data goes through it, one write per batch, and the metadata through
    ``fd`` (different clusters; the kernel keeps the page cache coherent
    with O_DIRECT writes anyway).  ``name`` (the output's) is for errors."""

    def __init__(self, settings, fd, *, stream=False, spool_dir=None, direct=None,
                 name="output"):
        self.settings = settings
        self.name = name
        self.geo = settings.geometry()
        self.fd = fd
        self.stream = stream
        self.direct = direct
        self._scratch = None        # gather buffer of the direct writes
        self.packer = DataPacker(self.geo)
        self.table = ClusterTable()
        if stream:
            import tempfile
            self._spool = tempfile.TemporaryFile(dir=spool_dir, prefix="qcow2fast-spool-")
            self._data_fd, self._data_base = self._spool.fileno(), 0
            self._data_name = f"the spool file in {spool_dir or tempfile.gettempdir()}"
        else:
            self._spool = None
            self._data_fd, self._data_base = fd, self.geo.cluster_size
            self._data_name = name
            if is_device(fd):
                # A device may hold an old image: cluster 0 must not look
                # like one until the new header goes in, last.
                pwrite_all(fd, bytes(self.geo.cluster_size), 0)
        # Buffered data writes to a regular file get their pages made ahead
        # (hostfile.Prefault), which needs the file to reach past them:
        # it is grown (never shrunk: placements only move forward) to
        # _grown, and finish() sets the real size.
        self._prefault = prefault_for(self._data_fd) if direct is None else None
        self._grown = 0

    def append(self, first, kinds, payloads, buf=None):
        """One batch of guest clusters from cluster ``first``, batches in
        order: ``kinds`` per cluster and,
        for each DATA/COMPRESSED one, its bytes (a compressed payload is
        shorter than a cluster) -- or, with ``payloads`` None, the DATA
        clusters are those of ``buf`` (one cluster per entry of ``kinds``).
        Places the data and returns the write to do (a callable, safe to run
        on another thread: the places of batches never overlap)."""
        kinds = np.asarray(kinds, np.uint8)
        rel = np.zeros(len(kinds), np.uint64)
        clen = np.zeros(len(kinds), np.uint64)
        bufs, start = [], self.packer.pos
        if payloads is None:
            # Uncompressed: whole clusters, contiguous in the output.
            cs = self.geo.cluster_size
            idx = np.flatnonzero(kinds == DATA)
            off, pad = self.packer.place(len(idx) * cs, False)
            if pad:
                bufs.append(bytes(pad))
            rel[idx] = np.arange(len(idx), dtype=np.uint64) * np.uint64(cs) + np.uint64(off)
            clen[idx] = cs
            bufs += [buf[a * cs:b * cs] for a, b in runs(kinds == DATA)]
        else:
            idx = np.flatnonzero((kinds == DATA) | (kinds == COMPRESSED))
            for i, data in zip(idx, payloads):
                off, pad = self.packer.place(len(data), kinds[i] == COMPRESSED)
                if pad:
                    bufs.append(bytes(pad))
                bufs.append(data)
                rel[i], clen[i] = off, len(data)
        self.table.add(first, kinds, rel, clen)
        if self._prefault is not None and self._prefault.active and bufs:
            self._ahead(self._data_base + start, self.packer.pos - start)
        return lambda: self._write(bufs, start)

    GROW_STEP = 64 << 20

    def _ahead(self, off, n):
        if off + n > self._grown:
            self._grown = off + n + self.GROW_STEP
            set_size(self._data_fd, self._grown, self._data_name)
        self._prefault.ahead(off, n)

    def _write(self, bufs, rel):
        if not bufs:            # a batch without data clusters
            return
        off = self._data_base + rel
        if self.direct is not None:
            self._scratch, data = gather(bufs, self._scratch)
            self.direct.pwrite(data, off)
            return
        t0 = time.thread_time()
        err, end = pwrite_buffers(self._data_fd, bufs, off)     # (the GIL released once)
        if err:
            raise write_error(OSError(err, os.strerror(err)), end, self._data_name)
        if self._prefault is not None:
            self._prefault.wrote(end - off, time.thread_time() - t0)

    def finish(self, size, sync=False):
        """Write the metadata (and, for a stream, the spooled data); the
        header goes last for a file, after a barrier when ``sync``."""
        self._stop_prefault()
        data_len = -(-self.packer.pos // self.geo.cluster_size) * self.geo.cluster_size
        base, pieces, file_end = build_metadata(self.settings, size, self.table, data_len,
                                                stream=self.stream)
        if self.stream:
            pos = 0
            for off, data in pieces:
                _write_all(self.fd, bytes(off - pos))
                _write_all(self.fd, data)
                pos = off + len(data)
            _write_all(self.fd, bytes(base - pos))
            self._spool.truncate(data_len)
            self._spool.seek(0)
            _copy_to(self._spool, self.fd, data_len)
            self._spool.close()
            return file_end
        set_size(self.fd, file_end, self.name)
        for off, data in pieces[1:]:
            pwrite_all(self.fd, data, off, self.name)
        if sync:
            os.fdatasync(self.fd)   # barrier: everything the header points to is stable
        pwrite_all(self.fd, pieces[0][1], 0, self.name)
        return file_end

    def _stop_prefault(self):
        if self._prefault is not None:
            self._prefault.close()
            self._prefault = None

    def close(self):
        self._stop_prefault()
        if self._spool is not None and not self._spool.closed:
            self._spool.close()


def runs(mask):
    """[a, b) index runs where ``mask`` is true."""
    m = np.concatenate(([False], mask, [False]))
    d = np.flatnonzero(m[1:] != m[:-1])
    return zip(d[0::2].tolist(), d[1::2].tolist())


def gather(bufs, scratch):
    """(scratch, data): ``bufs`` back to back in one buffer -- the only one
    if there is one, else a copy in ``scratch``, an mmap (page aligned, for
    O_DIRECT) replaced by a larger one when too small."""
    if len(bufs) == 1:
        return scratch, bufs[0]
    views = [memoryview(b).cast("B") for b in bufs]
    total = sum(len(v) for v in views)
    if scratch is None or len(scratch) < total:
        scratch = mmap.mmap(-1, max(total, 2 << 20))
    pos = 0
    for v in views:
        scratch[pos:pos + len(v)] = v
        pos += len(v)
    return scratch, memoryview(scratch)[:pos]


def _write_all(fd, data):
    mv = memoryview(data).cast("B")
    while len(mv):
        mv = mv[os.write(fd, mv):]


def _copy_to(src, fd, n):
    """Copy ``n`` bytes of the file ``src`` (at its position) to ``fd``."""
    try:
        while n > 0:
            sent = os.sendfile(fd, src.fileno(), None, min(n, 1 << 30))
            if sent == 0:
                break
            n -= sent
    except OSError as e:
        import errno
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
    if n > 0:
        with os.fdopen(os.dup(fd), "wb", closefd=True) as out:
            shutil.copyfileobj(src, out, 1 << 20)
