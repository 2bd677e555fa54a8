"""Copying persistent dirty bitmaps between images: ``convert --bitmaps
[--skip-broken-bitmaps]`` (qemu-img.c's convert_check_bitmaps and
convert_copy_bitmaps, with qemu 7.2's messages)."""

from ..errors import ConvertError, InvalidArgumentError, Qcow2Error


def _persistent(img):
    """The source's bitmaps in the order qemu walks them (the reverse of the
    directory: qemu's in-memory list takes each loaded bitmap at its head)."""
    return list(reversed(img.bitmaps))


def check_bitmap_copy(source, out_fmt, compat_v3, skip_broken):
    """Before converting: may ``source`` (an open image) give its bitmaps to
    a new ``out_fmt`` image?  Raises ConvertError with qemu's message."""
    if out_fmt != "qcow2" or not compat_v3:
        raise ConvertError(f"Format driver '{out_fmt}' does not support bitmaps")
    if getattr(source, "dirty_bitmaps", None) is None or source.header.version < 3:
        raise ConvertError("Source lacks bitmap support")
    for b in _persistent(source):
        if b.inconsistent and not skip_broken:
            raise ConvertError(f"Cannot copy inconsistent bitmap '{b.name}'\nTry "
                               "--skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to "
                               "delete it")


def copy_bitmaps(source, dest, skip_broken, warn):
    """Add every consistent bitmap of ``source`` to ``dest`` (open for
    writing) with its granularity and enabled state, and its bits.
    ``warn(message)`` is told of each inconsistent bitmap skipped."""
    made = []
    todo = []
    for b in _persistent(source):
        if b.inconsistent and skip_broken:
            warn(f"Skipping inconsistent bitmap '{b.name}'")
            continue
        todo.append(b)
    # qemu creates them in the order it walks them; each lands at the head of
    # its list, so the new directory keeps the source's order
    for b in todo:
        try:
            dest.add_bitmap(b.name, b.granularity, disabled=not b.enabled)
        except InvalidArgumentError as e:
            raise ConvertError(f"Failed to create bitmap {b.name}: {e}") from None
        made.append(b)
    for b in made:
        try:
            dest.merge_bitmap(b.name, b.name, source_image=source)
        except Qcow2Error as e:
            raise ConvertError(f"Failed to populate bitmap {b.name}: {e}") from None
    _reorder(dest, [b.name for b in reversed(made)])


def _reorder(dest, names):
    """The new bitmaps in the directory in ``names``' order (the source's)."""
    d = dest.dirty_bitmaps
    new = [d.by_name[n] for n in names]
    ids = {id(b) for b in new}
    d.list = [b for b in d.list if id(b) not in ids] + new
