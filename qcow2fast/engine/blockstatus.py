"""Block status the way qemu computes it for ``qemu-img map`` and
``measure``: the image's own extents, refined by asking the host file about
holes inside data clusters when (and only when) qemu would.

qemu asks the host file only for layers that look metadata-preallocated
(qcow2_detect_metadata_preallocation); there, parts of data clusters that
are holes in the file (or lie past its end) read as zeros and are reported
so.
"""

import errno
import os

from .._ext.hookfile import HookFile
from .._ext.kernels import refcount_count_used
from ..spec.constants import BE64, REFT_OFFSET_MASK


def chain_files(img):
    """For each layer of the chain, top first: (the layer, its file's size,
    whether qemu would ask the file about holes inside data clusters).  A
    layer file a deep chain suspended (engine/chain.py) is reopened while
    it is asked."""
    out = []
    while img is not None:
        qcow2 = getattr(img, "header", None) is not None
        with _file_open(img):
            out.append((img, img.file.size(), qcow2 and looks_preallocated(img)))
        img = img.backing
    return out


class _file_open:
    """The layer's file open (resumed) and held so, under its lock."""

    def __init__(self, img):
        self.img = img if hasattr(img, "_wrlock") else None

    def __enter__(self):
        img = self.img
        if img is not None:
            img._wrlock()
            while img.file.closed:
                img._unlock()
                img._resume()
                img._wrlock()

    def __exit__(self, *exc):
        if self.img is not None:
            self.img._unlock()


def looks_preallocated(img):
    """qemu's metadata-preallocation heuristic (qcow2_detect_metadata_
    preallocation): at least max(real * 10 / 9, real + 2) clusters are in use
    by refcount, where ``real`` is how many clusters the file really
    occupies.  Only then does qemu look for holes in the host file."""
    if isinstance(img.file, HookFile):
        return False            # a remote file has no holes to ask about (qemu's curl neither)
    cs = img.cluster_size
    file_size = img.file.size()
    real = os.fstat(img.file.fd).st_blocks * 512 // cs
    threshold = max(real * 10 // 9, real + 2)
    end_cluster = -(-file_size // cs)
    h, geo = img.header, img.geo
    table = img.file.pread(h.refcount_table_offset, h.refcount_table_clusters * cs)
    used = 0
    for t in range(min(len(table) // 8, -(-end_cluster // geo.rb_entries))):
        block = BE64.unpack_from(table, 8 * t)[0] & REFT_OFFSET_MASK
        if not block or block + cs > file_size:
            continue
        n = min(geo.rb_entries, end_cluster - t * geo.rb_entries)
        used += refcount_count_used(img.file.pread(block, cs), geo.refcount_order, n)
    return used >= threshold


def split_host_holes(extents, files):
    """Split data extents where their host range is a hole in the file (or
    past its end): such parts read as zeros, and qemu-img map says so
    ("zero": true) when it asks the file -- which it does only for layers
    that look preallocated (see looks_preallocated).  Returns (extent,
    zero) pairs; other extents pass with zero=None."""
    out = []
    for e in extents:
        if e.kind != "data" or not files[e.depth][2]:
            out.append((e, None))
            continue
        layer, size, _ = files[e.depth]
        with _file_open(layer):
            out.extend(_split(e, layer.file.fd, size))
    return out


def _split(e, fd, size):
    """Data extent ``e`` cut where its host range is a hole or past ``size``."""
    out = []
    pos, end = e.host_offset, e.host_offset + e.length
    while pos < end:
        if pos >= size:
            nxt, zero = end, True
        else:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.EINVAL:
                    data = None       # no SEEK_DATA (a block device): all data
                elif err.errno == errno.ENXIO:
                    data = size       # no data after pos: a hole up to the end
                else:
                    raise
            if data is None:
                nxt, zero = end, False
            elif data > pos:
                nxt, zero = min(data, end), True
            else:
                nxt, zero = min(os.lseek(fd, pos, os.SEEK_HOLE), end), False
        delta = pos - e.host_offset
        out.append((e._replace(offset=e.offset + delta, length=nxt - pos,
                               host_offset=pos), zero))
        pos = nxt
    return out
