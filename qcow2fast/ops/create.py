"""Creating images (qemu's qcow2_co_create), with qemu-img's -o options.

Layout: the header cluster, a one-cluster refcount table and one refcount
block are written first; the image is then opened and the L1 table (and any
preallocation) is allocated through the ordinary allocator, so every
refcount structure it needs is created by the same code that grows a live
image.
"""

import os
from typing import NamedTuple, Optional, Union

import numpy as np

from ..spec import header as hdr
from ..host import file as hostfile
from .._ext.fileio import File
from ..engine.backing import probe_format, resolve_backing_path
from ..errors import InvalidArgumentError
from ..spec.geometry import Geometry
from .measure import check_extended_l2

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


def create(path: Union[str, "os.PathLike[str]"], size: Optional[int] = None, *,
           cluster_size: int = 65536, compat: Union[str, int] = "1.1", refcount_bits: int = 16,
           lazy_refcounts: bool = False, backing_file: Optional[str] = None,
           backing_format: Optional[str] = None, compression_type: str = "zlib",
           preallocation: str = "off", extended_l2: bool = False) -> None:
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
    reftable = np.zeros(cs // 8, dtype=">u8")
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
        img._set_disk_size(size, preallocation)
    f = File(path, writable=True)
    try:
        f.sync_all()
    finally:
        f.close()


class Settings(NamedTuple):
    """Validated creation options (what a new image's header says)."""
    size: int
    version: int
    cluster_bits: int
    refcount_order: int
    compression_type: int
    lazy_refcounts: bool
    backing_file: Optional[str]
    backing_format: Optional[str]
    preallocation: str
    extended_l2: bool = False

    def geometry(self):
        return Geometry(self.cluster_bits, self.refcount_order, extended_l2=self.extended_l2)

    def header(self, **fields):
        """A Header for these settings (size 0 unless given in ``fields``)."""
        h = hdr.Header(version=self.version, cluster_bits=self.cluster_bits,
                       refcount_order=self.refcount_order,
                       compression_type=self.compression_type,
                       backing_file=self.backing_file or None,
                       backing_format=self.backing_format, **fields)
        if self.version == 3:
            if self.lazy_refcounts:
                h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
            if self.compression_type != hdr.COMPRESSION_ZLIB:
                h.incompatible_features |= hdr.INCOMPAT_COMPRESSION
            if self.extended_l2:
                h.incompatible_features |= hdr.INCOMPAT_EXTL2
        else:
            h.header_length = hdr.V2_HEADER_LENGTH
        return h


def validate_options(path, size=None, *, cluster_size=65536, compat="1.1", refcount_bits=16,
                     lazy_refcounts=False, backing_file=None, backing_format=None,
                     compression_type="zlib", preallocation="off", extended_l2=False,
                     size_known=True):
    """Check create()'s options as qemu does; returns :class:`Settings`.
    ``size_known=False`` skips the size checks (a stream of unknown length)."""
    cluster_bits = _log2(cluster_size, "cluster_size")
    if not hdr.MIN_CLUSTER_BITS <= cluster_bits <= hdr.MAX_CLUSTER_BITS:
        raise InvalidArgumentError("cluster_size must be a power of two between 512 B and 2 MiB")
    if compat in ("0.10", "v2", 2):
        version = 2
    elif compat in ("1.1", "v3", 3):
        version = 3
    else:
        raise InvalidArgumentError(f"compat must be '0.10' or '1.1', not {compat!r}")
    refcount_order = _log2(refcount_bits, "refcount_bits")
    if refcount_order > 6:
        raise InvalidArgumentError("refcount_bits must be a power of two between 1 and 64")
    if version == 2 and refcount_bits != 16:
        raise InvalidArgumentError("refcount widths other than 16 bits require compat=1.1")
    if version == 2 and lazy_refcounts:
        raise InvalidArgumentError("lazy_refcounts requires compat=1.1")
    ctype = {v: k for k, v in hdr.COMPRESSION_NAMES.items()}.get(compression_type)
    if ctype is None:
        raise InvalidArgumentError(f"compression_type must be 'zlib' or 'zstd', "
                                   f"not {compression_type!r}")
    if version == 2 and ctype != hdr.COMPRESSION_ZLIB:
        raise InvalidArgumentError("compression_type other than zlib requires compat=1.1")
    check_extended_l2(extended_l2, version, 1 << cluster_bits)
    if preallocation not in PREALLOCATION_MODES:
        raise InvalidArgumentError(f"preallocation must be one of {', '.join(PREALLOCATION_MODES)}")
    if backing_format is not None and not backing_file:
        raise InvalidArgumentError("backing_format given without backing_file")
    if backing_file and preallocation != "off":
        raise InvalidArgumentError("backing_file and preallocation cannot be combined")
    if backing_file:
        bpath = resolve_backing_path(path, backing_file)
        if backing_format is None:
            backing_format = probe_format(bpath)
        if size is None and size_known:
            size = _image_size(bpath, backing_format)
    if backing_file and len(backing_file.encode()) > hdr.MAX_BACKING_FILE_SIZE:
        raise InvalidArgumentError("backing file name longer than 1023 bytes")
    if size_known:
        if size is None:
            raise InvalidArgumentError("size is required without a backing file")
        if size < 0:
            raise InvalidArgumentError(f"size must not be negative ({size})")
        size = -(-int(size) // 512) * 512
        geo = Geometry(cluster_bits, refcount_order, extended_l2=extended_l2)
        if geo.l1_size_for(size) > hdr.MAX_L1_BYTES // 8:
            raise InvalidArgumentError(f"size {size} is too large for cluster_size "
                                       f"{cluster_size}")
    return Settings(size, version, cluster_bits, refcount_order, ctype, bool(lazy_refcounts),
                    backing_file or None, backing_format, preallocation, bool(extended_l2))


def _image_size(path, fmt):
    if fmt == "qcow2":
        from ..engine.image import Image
        with Image(path, "r", backing=False, cache_clean_interval=0) as img:
            return img.size
    fd = os.open(path, os.O_RDONLY)
    try:
        return hostfile.size(fd)        # block devices too
    finally:
        os.close(fd)


def _log2(value, name):
    value = int(value)
    if value <= 0 or value & (value - 1):
        raise InvalidArgumentError(f"{name} must be a power of two, not {value}")
    return value.bit_length() - 1
