"""qemu-img check -r leaks / -r all: carrying out the repair that
:func:`qcow2fast.fsck.check.check_image` planned (refcount fixes in place,
COPIED flags, reserved L1 bits, and a rebuild through
:mod:`qcow2fast.fsck.rebuild` when refcount structures are damaged).
Guest data is never touched, and nothing the check did not understand is
freed.
"""

import os

import numpy as np

from ..errors import Qcow2Error, RepairError
from ..spec.constants import BE64, REFT_OFFSET_MASK
from ..spec.entries import decode_table
from ..spec.geometry import Geometry
from ..spec.header import FIELD_OFFSET, FIELD_STRUCT, pack_fields
from . import snapshot_table
from .rebuild import rebuild_refcounts


def repair_image(path, first, mode):
    """Carry out the repair that ``first`` (the CheckResult of
    check_image(path, fix=mode)) planned, as qemu-img check -r ``mode``
    ("leaks" or "all") does.  Raises Qcow2Error when it cannot be done.

    Refcount and COPIED fixes are written in place (the refcount blocks
    they touch exist: a refcount of 0 that should not be is a rebuild);
    a rebuild goes through an Image opened for writing and
    rebuild_refcounts.  Guest data is never touched."""
    if first.check_errors:
        raise RepairError("Check failed: Input/output error")
    rebuild = mode == "all" and first.rebuild
    if first.snapshot_repairs is not None:     # first: the header parses after it
        snapshot_table.fix_count(path, first.snapshot_repairs)
    _drop_stale_bitmaps(path)
    _write_fixes(path, first)
    if rebuild:
        try:
            _rebuild(path, first)
        except Qcow2Error as e:
            raise RepairError(f"Check failed: cannot rebuild the refcount structures: {e}") from e
    if first.snapshot_repairs is not None and first.snapshot_repairs.rewrite:
        snapshot_table.rewrite(path)
    if rebuild:
        remaining = first.malformed
    else:
        remaining = first.corruptions - (len(first.too_low) if mode == "all" else 0)
    if not remaining and first.flags:
        _set_incompatible_bit(path, first.flags, False)     # qemu's mark clean + consistent


def _write_fixes(path, first):
    from ..spec import header as hdr
    from .._ext.fileio import File
    from .._ext.kernels import refcount_decode, refcount_encode
    f = File(str(path), writable=True, direct=False)
    try:
        size = f.size()
        h = hdr.parse_header(f.pread(0, min(size, 2 << 20)), size)
        geo = Geometry(h.cluster_bits, h.refcount_order)
        cs, E = geo.cluster_size, geo.rb_entries
        table = decode_table(f.pread(h.refcount_table_offset, h.refcount_table_clusters * cs))
        by_block = {}
        for c, value in first.refcount_fixes:
            by_block.setdefault(c // E, []).append((c % E, value))
        block = np.zeros(E, dtype=np.uint64)
        for t, fixes in sorted(by_block.items()):
            off = int(table[t]) & REFT_OFFSET_MASK
            raw = bytearray(f.pread(off, cs))
            refcount_decode(bytes(raw), geo.refcount_order, block)
            for i, value in fixes:
                block[i] = value
            refcount_encode(block, geo.refcount_order, raw)
            f.pwrite(bytes(raw), off)
        if first.entry_fixes:
            f.sync()            # barrier: refcounts before the COPIED flags relying on them
            for off, value in first.entry_fixes:
                f.pwrite(BE64.pack(value), off)
        f.sync()
    finally:
        f.close()


def _drop_stale_bitmaps(path):
    """Bitmaps disowned by a program that does not know them: their
    extension goes, as qemu's open for writing drops it (their clusters
    are the leaks being repaired)."""
    from ..spec import header as hdr
    from .._ext.fileio import File
    from ..engine.bitmap_list import drop_stale_extension
    f = File(str(path), writable=True, direct=False)
    try:
        size = f.size()
        drop_stale_extension(f, hdr.parse_header(f.pread(0, min(size, 2 << 20)), size))
    finally:
        f.close()


def _rebuild(path, first):
    from ..engine.image import Image
    corrupt = first.flags & 2
    # Image opens an image marked corrupt read-only: lift the mark for the
    # rebuild, and put it back if the rebuild fails.
    if corrupt:
        _set_incompatible_bit(path, 2, False)
    try:
        # The caller holds the image's locks (check_cmd's lock.Holder).  No
        # guest data moves: an encrypted image needs no key (no_io).
        img = Image(str(path), "r+", cache_clean_interval=0, backing=False, locking=False,
                    no_io=True, _repair=True)
        try:
            rebuild_refcounts(img)
        finally:
            img.close()
    except BaseException:
        if corrupt:
            _set_incompatible_bit(path, 2, True)
        raise


def _set_incompatible_bit(path, bit, on):
    """Set or clear one incompatible-feature bit of a v3 header in place."""
    field = FIELD_STRUCT["incompatible_features"]
    with open(path, "r+b") as f:
        f.seek(FIELD_OFFSET["incompatible_features"])
        (v,) = field.unpack(f.read(field.size))
        at, data = pack_fields(incompatible_features=(v | bit) if on else (v & ~bit))
        f.seek(at)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_and_repair(path, mode=None):
    """qemu-img check [-r ``mode``] without its output: check, repair what
    the check planned when ``mode`` ("leaks" or "all") asks for it, then
    check again; returns the final CheckResult (its ``*_fixed`` counts
    those of the repair).  Raises Qcow2Error/OSError as check_image and
    repair_image do."""
    from .check import check_image
    first = check_image(path, mode)
    if first.failed or not mode or not (first.leaks or first.corruptions
                                        or first.corruptions_fixed or first.flags):
        return first
    repair_image(path, first, mode)
    if not (first.leaks_fixed or first.corruptions_fixed):
        return first
    result = check_image(path)
    result.leaks_fixed, result.corruptions_fixed = first.leaks_fixed, first.corruptions_fixed
    return result
