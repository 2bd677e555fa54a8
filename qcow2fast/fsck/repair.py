"""qemu-img check -r leaks / -r all: carrying out the repair that
:func:`qcow2fast.fsck.check.check_image` planned (refcount fixes in place,
COPIED flags, reserved L1 bits, and new refcount structures laid out by
:mod:`qcow2fast.fsck.new_structures` when the old ones are damaged).
Guest data is never touched, and nothing the check did not understand is
freed.
"""

import numpy as np

from ..errors import RepairError
from ..spec.constants import BE64, REFT_OFFSET_MASK
from ..spec.entries import decode_table
from ..spec.geometry import Geometry
from ..spec.header import FIELD_OFFSET, FIELD_STRUCT, pack_fields
from . import new_structures, snapshot_table


def repair_image(path, first, mode):
    """Carry out the repair that ``first`` (the CheckResult of
    check_image(path, fix=mode)) planned, as qemu-img check -r ``mode``
    ("leaks" or "all") does.  Raises Qcow2Error when it cannot be done.

    Refcount and COPIED fixes are written in place (the refcount blocks
    they touch exist: a refcount of 0 that should not be is a rebuild);
    a rebuild writes the check's plan of new refcount structures before
    the L1/L2 entry fixes that rely on their refcounts.  Guest data is
    never touched."""
    if first.check_errors:
        raise RepairError("Check failed: Input/output error")
    rebuild = mode == "all" and first.rebuild
    if rebuild and first.rebuild_refused:
        raise RepairError("Check failed: cannot rebuild the refcount structures: "
                          f"{first.rebuild_refused}")
    if first.snapshot_repairs is not None:     # first: the header parses after it
        snapshot_table.fix_count(path, first.snapshot_repairs)
    _drop_stale_bitmaps(path)
    if first.grow_to or rebuild:
        _write_structures(path, first.grow_to, first.new_structures if rebuild else None)
    _write_fixes(path, first)
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
    from ..host.file import open_in_place
    from .._ext.kernels import refcount_decode, refcount_encode
    f = open_in_place(path)
    try:
        size = f.size()
        h = hdr.parse_header(f.pread(0, min(size, 2 << 20)), size, check=True)
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
    from ..host.file import open_in_place
    from ..engine.bitmap_list import drop_stale_extension
    f = open_in_place(path)
    try:
        size = f.size()
        drop_stale_extension(f, hdr.parse_header(f.pread(0, min(size, 2 << 20)), size,
                                                check=True))
    finally:
        f.close()


def _write_structures(path, grow_to, structure_plan):
    """Grow the file to ``grow_to`` (a refcount block past its end, as
    qemu's check does), then write ``structure_plan`` (a
    new_structures.StructurePlan, or None)."""
    from ..spec import header as hdr
    from ..host.file import open_in_place
    f = open_in_place(path)
    try:
        size = f.size()
        if grow_to > size:
            f.truncate(grow_to)
        if structure_plan is not None:
            h = hdr.parse_header(f.pread(0, min(size, 2 << 20)), size, check=True)
            new_structures.write(f, Geometry(h.cluster_bits, h.refcount_order), structure_plan)
        else:
            f.sync()    # barrier: the refcount block's cluster exists before fixes rely on it
    finally:
        f.close()


def _set_incompatible_bit(path, bit, on):
    """Set or clear one incompatible-feature bit of a v3 header in place."""
    from ..host.file import open_in_place
    field = FIELD_STRUCT["incompatible_features"]
    f = open_in_place(path)
    try:
        (v,) = field.unpack(f.pread(FIELD_OFFSET["incompatible_features"], field.size))
        at, data = pack_fields(incompatible_features=(v | bit) if on else (v & ~bit))
        f.pwrite(data, at)
        f.sync()
    finally:
        f.close()


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


def repair_dirty(path):
    """What qemu does first when it opens a dirty image for writing
    (qcow2_do_open): check -r all, without the check after.  Returns the
    check's CheckResult (its messages are qemu's lines); RepairError when
    the image cannot be made clean."""
    from .check import check_image
    first = check_image(path, "all")
    if first.failed:
        raise RepairError(f"Could not repair dirty image: {first.failed}")
    repair_image(path, first, "all")
    return first
