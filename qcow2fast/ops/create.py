"""Creating images (qemu's qcow2_co_create), with qemu-img's -o options.

Layout: the header cluster, a one-cluster refcount table and one refcount
block are written first; the image is then opened and the L1 table (and any
preallocation) is allocated through the ordinary allocator, so every
refcount structure it needs is created by the same code that grows a live
image.
"""

import os
from array import array
from typing import Optional, Union

from .._ext.fileio import File
from ..errors import UnsupportedFeatureError
from ..host import remote
from ..host.lock import check_create
from ..host.remote import is_url
from ..spec.constants import REFTABLE_ENTRY_SIZE, SECTOR
from ..spec.tables import encode_table
from ..engine.datafile import resolve
from ..spec.datafile import set_data_file, validate_create
from .options import validate_options


def create(path: Union[str, "os.PathLike[str]"], size: Optional[int] = None, *,
           cluster_size: int = 65536, compat: Union[str, int] = "1.1", refcount_bits: int = 16,
           lazy_refcounts: bool = False, backing_file: Optional[str] = None,
           backing_format: Optional[str] = None, compression_type: str = "zlib",
           preallocation: str = "off", extended_l2: bool = False,
           data_file: Optional[str] = None, data_file_raw: bool = False,
           encrypt: Optional[dict] = None) -> None:
    """Create a qcow2 image; the options mean what qemu-img's ``-o`` options mean.

    ``size`` may be None when ``backing_file`` is given: the backing file's
    size is used.  Sizes are rounded up to a multiple of 512, as qemu does.
    ``data_file``: the name of an external data file (created, emptied if
    it exists, as qemu does; a relative name is taken from the image's
    directory); ``data_file_raw``: keep it a raw image of the disk
    (engine/datafile.py).
    ``encrypt``: qemu-img's ``encrypt.*`` options as a dict (engine/crypto_setup.py),
    e.g. ``{"format": "luks", "key_secret": b"passphrase", "iter_time": 100}``.
    """
    from ..engine.crypto_setup import encrypt_options, set_up
    encrypt = encrypt_options(encrypt)
    path = os.fspath(path)
    st = validate_options(path, size, cluster_size=cluster_size, compat=compat,
                          refcount_bits=refcount_bits, lazy_refcounts=lazy_refcounts,
                          backing_file=backing_file, backing_format=backing_format,
                          compression_type=compression_type, preallocation=preallocation,
                          extended_l2=extended_l2)
    size, refcount_order = st.size, st.refcount_order
    validate_create(data_file, data_file_raw, st.version, st.backing_file)
    if data_file_raw and preallocation == "off":
        preallocation = "metadata"      # every L2 entry allocated (qemu's qcow2_co_create)

    geo = st.geometry()
    cs = geo.cluster_size
    # The header starts with size 0 (no L1 table needed); the L1 table is
    # allocated once the image is open, by growing it (Image.resize).
    h = st.header(refcount_table_offset=cs, refcount_table_clusters=1)
    if data_file:
        set_data_file(h, data_file, data_file_raw)
    head = h.pack()
    reftable = encode_table([2 * cs] + [0] * (cs // REFTABLE_ENTRY_SIZE - 1))
    # The refcount block counts the header, the refcount table and itself.
    refblock = array("Q", [1, 1, 1]) + array("Q", [0]) * (geo.rb_entries - 3)
    block = bytearray(cs)
    from .._ext.kernels import refcount_encode
    refcount_encode(refblock, refcount_order, block)
    if data_file:
        if is_url(path):
            raise UnsupportedFeatureError(f"{path}: an external data file beside a remote "
                                          "image is not supported", feature="data_file")
        check_create(path)
        _create_data_file(resolve(path, data_file))
    f = _new_file(path)
    try:
        f.pwrite(head.ljust(cs, b"\0") + reftable + block, 0)
    finally:
        f.close()

    from ..engine.image import Image
    with Image(path, "r+", cache_mode="unsafe", backing=False,
               cache_clean_interval=0) as img:
        if encrypt is not None:
            set_up(img, encrypt)    # before the size, as qemu: preallocation is encrypted
        if is_url(path) and preallocation in ("falloc", "full"):
            # (qemu's ssh driver grows a file by writing its last byte only)
            raise UnsupportedFeatureError("Could not resize image: Failed to resize underlying "
                                          "file: Unsupported preallocation mode "
                                          f"'{preallocation}'", feature="preallocation")
        img.resize(size, preallocation=preallocation)
        l1_end = img.header.l1_table_offset + img.header.l1_size * 8
    f = remote.open_file(path, writable=True) if is_url(path) else File(path, writable=True)
    try:
        # As qemu's: the file ends where the L1 table, the last thing
        # written, ends (the rest of its cluster is allocated, not written).
        if l1_end and f.size() == -(-l1_end // cs) * cs and preallocation == "off":
            # (over ssh qemu writes whole 512-byte sectors: the file ends
            # at the sector holding the table's end)
            f.truncate(-(-l1_end // SECTOR) * SECTOR if is_url(path) else l1_end)
        f.sync_all()
    finally:
        f.close()


def _new_file(path):
    """The image's file, new or emptied: local (not while another process
    uses it, as qemu's file create), or on an ssh:// server."""
    if is_url(path):
        return remote.create_file(path)
    check_create(path)
    return File(path, writable=True, create=True)


def _create_data_file(path):
    """The external data file, empty (qemu's file create truncates it; the
    image's resize gives it its size)."""
    check_create(path)
    f = File(path, writable=True, create=True)
    try:
        if not f.is_device:
            f.truncate(0)
    finally:
        f.close()
