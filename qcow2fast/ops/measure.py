"""How large a qcow2 or raw image needs to be (qemu's qcow2_measure and
raw_measure, with qemu 7.2's numbers).

``fully_allocated`` is the file size with every cluster allocated:
header, L1 and L2 tables, refcount structures (found as the fixed point
where they count themselves) and data.  ``required`` drops the data
clusters the source does not use: regions that read as zeros are skipped,
and every cluster touched by data counts whole.
"""

from ..engine.blockstatus import chain_files, split_host_holes
from ..errors import InvalidArgumentError
from ..spec.constants import L1E_SIZE, L2E_SIZE_NORMAL
from ..spec.geometry import Geometry
from ..spec.bitmaps import stored_size
from .options import validate_options


def _round_up(n, m):
    return -(-n // m) * m


def refcount_metadata_size(clusters, cluster_size, refcount_order):
    """Bytes of refcount table and blocks needed to count ``clusters``
    clusters plus themselves."""
    geo = Geometry(cluster_size.bit_length() - 1, refcount_order)
    return sum(geo.refcount_layout(clusters)) * cluster_size


def prealloc_size(virtual_size, cluster_size, refcount_order, l2e_size=L2E_SIZE_NORMAL):
    """qcow2_calc_prealloc_size: the fully allocated file size (``l2e_size``:
    16 with extended L2 entries)."""
    aligned = _round_up(virtual_size, cluster_size)
    meta = cluster_size                                         # header
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e_size)
    meta += nl2e * l2e_size                                     # L2 tables
    nl1e = _round_up(nl2e * l2e_size // cluster_size, cluster_size // L1E_SIZE)
    meta += nl1e * L1E_SIZE                                     # L1 table
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                   refcount_order)
    return meta + aligned


def data_required(img, cluster_size):
    """Bytes of whole destination clusters that hold the source's data
    (qemu's loop: zero regions skipped, each data region rounded out to
    clusters, the next search starting at the end of the last cluster)."""
    size = img.size
    extents = img.block_status(0, size) if size else []
    if img.header is not None:
        extents = split_host_holes(extents, chain_files(img))
    else:
        extents = [(e, None) for e in extents]
    required, pos = 0, 0
    for e, host_zero in extents:
        end = e.offset + e.length
        if end <= pos:
            continue
        start = max(e.offset, pos)
        if e.kind in ("zero", "unallocated") or host_zero:
            pos = end
            continue
        stop = _round_up(end, cluster_size)
        required += stop - (start - start % cluster_size)
        pos = stop
    return required


def measure(source=None, *, size=None, fmt="qcow2", cluster_size=65536, refcount_bits=16,
            compat="1.1", preallocation="off", backing_file=None, extended_l2=False):
    """{"required", "fully-allocated"[, "bitmaps"]} for a new image of format
    ``fmt`` holding ``source`` (an open Image or RawImage) or of ``size``."""
    if (source is None) == (size is None):
        raise InvalidArgumentError("measure needs exactly one of a source image and a size")
    if fmt == "raw":
        required = source.size if source is not None else _round_up(size, 512)
        return {"required": required, "fully-allocated": required}
    if fmt != "qcow2":
        raise InvalidArgumentError(f"cannot measure for format {fmt!r}")
    # create's rules: what measure accepts, create accepts (the backing
    # file only changes how much data is required here).
    st = validate_options(None, source.size if source is not None else size,
                          cluster_size=cluster_size, compat=compat,
                          refcount_bits=refcount_bits, preallocation=preallocation,
                          extended_l2=extended_l2, measuring=True)
    geo = st.geometry()
    cluster_size, version = geo.cluster_size, st.version
    if source is not None:
        virtual_size = _round_up(source.size, cluster_size)
        required = virtual_size if backing_file else data_required(source, cluster_size)
    else:
        virtual_size = _round_up(size, cluster_size)
        required = 0
    if preallocation in ("full", "falloc"):
        required = virtual_size
    fully = prealloc_size(virtual_size, cluster_size, geo.refcount_order, geo.l2_entry_bytes)
    out = {"required": fully - virtual_size + required, "fully-allocated": fully}
    # qemu shows "bitmaps" when both ends could hold persistent bitmaps: a
    # v3 destination and a v3 qcow2 source.
    src_header = getattr(source, "header", None)
    if version >= 3 and src_header is not None and src_header.version >= 3:
        bitmaps = [(b.name, b.entry.granularity_bits) for b in source.bitmaps]
        out = {"bitmaps": stored_size(bitmaps, source.size, cluster_size), **out}
    return out
