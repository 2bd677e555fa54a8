"""Creating images (qemu's qcow2_co_create), with qemu-img's -o options.

Layout: the header cluster, a one-cluster refcount table and one refcount
block are written first; the image is then opened and the L1 table (and any
preallocation) is allocated through the ordinary allocator, so every
refcount structure it needs is created by the same code that grows a live
image.
"""

import os

import numpy as np

from .._ext.fileio import File
from ..spec.constants import QCOW_OFLAG_COPIED, REFTABLE_ENTRY_SIZE
from .options import validate_options


def create(path, size=None, *, cluster_size=65536, compat="1.1", refcount_bits=16,
           lazy_refcounts=False, backing_file=None, backing_format=None,
           compression_type="zlib", preallocation="off", extended_l2=False):
    """Create a qcow2 image; the options mean what qemu-img's ``-o`` options mean.

    ``size`` may be None when ``backing_file`` is given: the backing file's
    size is used.  Sizes are rounded up to a multiple of 512, as qemu does.
    """
    path = os.fspath(path)
    st = validate_options(path, size, cluster_size=cluster_size, compat=compat,
                          refcount_bits=refcount_bits, lazy_refcounts=lazy_refcounts,
                          backing_file=backing_file, backing_format=backing_format,
                          compression_type=compression_type, preallocation=preallocation,
                          extended_l2=extended_l2)
    size, refcount_order = st.size, st.refcount_order

    geo = st.geometry()
    cs = geo.cluster_size
    # The header starts with size 0 (no L1 table needed); the L1 table is
    # allocated once the image is open, then the size is set.
    h = st.header(refcount_table_offset=cs, refcount_table_clusters=1)
    head = h.pack()
    reftable = np.zeros(cs // REFTABLE_ENTRY_SIZE, dtype=">u8")
    reftable[0] = 2 * cs
    refblock = np.zeros(geo.rb_entries, dtype=np.uint64)
    refblock[:3] = 1                        # header, refcount table, this block
    block = np.zeros(cs, dtype=np.uint8)
    from .._ext.kernels import refcount_encode
    refcount_encode(refblock, refcount_order, block)
    f = File(path, writable=True, create=True)
    try:
        f.pwrite(head.ljust(cs, b"\0") + reftable.tobytes() + block.tobytes(), 0)
    finally:
        f.close()

    from ..engine.image import Image
    with Image(path, "r+", cache_mode="unsafe", backing=False,
               cache_clean_interval=0) as img:
        m = img.mapping
        m.grow_l1(geo.l1_size_for(size), img.refcounts, img._barrier, img._flush_refcounts)
        img._set_l1(m.l1)
        img.header.size = size
        img._write_header_field("size")
        img._set_size(size)
        if preallocation != "off":
            _preallocate(img, preallocation)
    f = File(path, writable=True)
    try:
        f.sync_all()
    finally:
        f.close()


def _preallocate(img, mode):
    """Map every guest cluster to a host cluster (qemu's preallocation)."""
    geo = img.geo
    cs = geo.cluster_size
    total = geo.size_to_clusters(img.size)
    first_data = None
    pos = 0
    while pos < img.size:
        slot = img._l2_slot_for_write(pos)
        l2 = img.l2_cache.u64(slot)
        i0 = geo.l2_index(pos) & (geo.slice_entries - 1)
        n = min(geo.slice_entries - i0, total - (pos >> geo.cluster_bits))
        new = img.refcounts.alloc(n)
        img._host_limit_changed()
        first_data = new if first_data is None else first_data
        # (extended entries: a host cluster, no subcluster allocated -- as qemu)
        k = geo.l2_entry_words
        l2[i0 * k:(i0 + n) * k:k] = (np.arange(n, dtype=np.uint64) * np.uint64(cs)
                                     + np.uint64(new)) | np.uint64(QCOW_OFLAG_COPIED)
        img.l2_cache.mark_dirty(slot)
        end = new + n * cs
        img.alloc_end = max(img.alloc_end, end)
        if mode == "falloc":
            img.file.fallocate(new, n * cs)
        elif mode == "full":
            zeros = bytes(min(n * cs, 1 << 20))
            for off in range(new, end, len(zeros)):
                img.file.pwrite(zeros[:min(len(zeros), end - off)], off)
        pos += n << geo.cluster_bits
