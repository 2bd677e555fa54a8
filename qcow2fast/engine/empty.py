"""Emptying an image: every guest cluster unallocated again, so the image
reads as its backing file (qemu's qcow2_make_empty, which ``commit`` runs
on the committed image).

Where qemu resets the image completely (v3, no snapshots, no bitmaps, the
L1 table and three clusters inside one refcount block), the result is
qemu's byte for byte: the header, a one-cluster refcount table at cluster
1, its first refcount block at cluster 2, a zeroed L1 table at cluster 3,
and the file cut there.  qemu gets there by marking the image dirty and
rewriting the refcount structures in place; here the image only ever
leaks on the way, so ``qemu-img check`` finds it consistent at every
step.  That needs the layout ``create`` makes (refcount table and block
at clusters 1 and 2, L1 table at 3), which an overlay keeps unless it
was resized or has more than one refcount-table cluster; any other image
has its clusters discarded through the engine (qemu's fallback), which
keeps its metadata where it is.
"""

import array

from .._ext.kernels import refcount_encode
from ..host.file import open_image_file
from ..spec import header as hdr
from ..spec.constants import BE64, L1E_SIZE
from ..spec.geometry import Geometry



def make_empty(path, cache_mode="writeback"):
    """Unallocate every guest cluster of the (closed) qcow2 image at
    ``path``; it then reads as its backing file."""
    f = open_image_file(path, "qcow2", writable=True, locking=False)   # (a URL: host/remote)
    try:
        if _reset(f, sync=cache_mode != "unsafe"):
            return
    finally:
        f.close()
    _discard_all(path, cache_mode)


def _reset(f, sync):
    """The complete reset when the image has the layout it needs; returns
    whether it ran."""
    file_size = f.size()
    h = hdr.read_header(f, file_size)
    cs = h.cluster_size
    geo = Geometry(h.cluster_bits, h.refcount_order)
    l1_clusters = geo.size_to_clusters(h.l1_size * L1E_SIZE)
    if (h.version < 3 or h.nb_snapshots or h.crypt_method
            or h.incompatible_features & ~(hdr.INCOMPAT_COMPRESSION | hdr.INCOMPAT_EXTL2)
            or any(e.type in (hdr.EXT_BITMAPS, hdr.EXT_CRYPTO, hdr.EXT_DATA_FILE)
                   for e in h.other_extensions)
            or 3 + l1_clusters > geo.rb_entries
            or h.refcount_table_offset != cs or h.refcount_table_clusters != 1
            or h.l1_table_offset != 3 * cs
            or BE64.unpack(f.pread(cs, 8))[0] != 2 * cs):
        return False
    barrier = f.sync if sync else (lambda: None)
    end = (3 + l1_clusters) * cs
    # 1. The L1 table zeroed.  Barrier: no L2 table or data cluster is
    #    referenced any more (each is a leak until step 3 drops its count).
    f.pwrite(bytes(l1_clusters * cs), 3 * cs)
    barrier()
    # 2. The refcount table keeps only its first block.  Barrier: the other
    #    blocks, and what they counted, are out of the table (leaks at most;
    #    an 8-byte entry is never torn).
    f.pwrite(BE64.pack(2 * cs) + bytes(cs - 8), cs)
    barrier()
    # 3. The first block counts exactly the header, the table, itself and
    #    the L1 table.  Those entries read 1 before and after, so a torn
    #    write leaves old counts of unreferenced clusters: leaks.
    counts = array.array("Q", bytes(8 * geo.rb_entries))
    counts[:3 + l1_clusters] = array.array("Q", [1]) * (3 + l1_clusters)
    block = bytearray(cs)
    refcount_encode(counts, h.refcount_order, block)
    f.pwrite(block, 2 * cs)
    barrier()
    # 4. Nothing past the L1 table is referenced or counted: cut it off.
    if not f.is_device:
        f.truncate(end)
    if sync:
        f.sync_all()
    return True


def _discard_all(path, cache_mode):
    from .image import Image
    # Opened without its backing file: a discarded cluster then becomes
    # unallocated (reads from the backing file again), never a zero cluster.
    with Image(path, "r+", cache_mode=cache_mode, backing=False,
               cache_clean_interval=0, no_io=True) as img:     # (no data moves)
        if img.size:
            img.discard(0, img.size)
        img.flush()
