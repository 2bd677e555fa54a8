"""Header bits that change while an image is open (qemu's
qcow2_mark_dirty, qcow2_mark_clean, qcow2_mark_corrupt): the dirty bit of
lazy refcounts, the corrupt bit, and the auto-clear bits.

Each function is given the image's state and writes the header field
itself (from the one field table of spec/header.py).
"""

import contextlib

from ..spec import header as hdr


def write_header_field(state, name):
    """Write one header field of ``state.header`` to the image file."""
    state.file.pwrite(hdr.FIELD_STRUCT[name].pack(getattr(state.header, name)),
                      hdr.FIELD_OFFSET[name])


def write_header_fields(state, first, last):
    """Write header fields ``first`` to ``last`` (in header order) of
    ``state.header`` in one write: fields of the first 104 bytes share one
    sector, so a crash leaves all of them old or all new."""
    h = state.header
    values = [hdr.QCOW_MAGIC if f == "magic" else getattr(h, f) for f in hdr.HEADER_FIELDS]
    raw = hdr.HEADER.pack(*values)
    lo = hdr.FIELD_OFFSET[first]
    hi = hdr.FIELD_OFFSET[last] + hdr.FIELD_STRUCT[last].size
    state.file.pwrite(raw[lo:hi], lo)


def write_header(state, old_length):
    """Rewrite the whole header area (fields, extensions, backing file
    name: qemu's qcow2_update_header), zeroing what is left of the
    ``old_length`` bytes it took before."""
    raw = state.header.pack()
    state.file.pwrite(raw.ljust(old_length, b"\0"), 0)


def is_dirty(state):
    return bool(state.header.incompatible_features & hdr.INCOMPAT_DIRTY)


def with_dirty(incompatible_features, dirty):
    """``incompatible_features`` with the dirty bit set or cleared."""
    if dirty:
        return incompatible_features | hdr.INCOMPAT_DIRTY
    return incompatible_features & ~hdr.INCOMPAT_DIRTY


def set_dirty(state, dirty, sync=True):
    """Set or clear the dirty bit (v3 only) and make it stable: under lazy
    refcounts it is on disk before the first refcount update that is not
    ordered before its L2 entry.  ``sync=False`` (clearing only): no
    barrier of its own -- a cleared bit protects nothing, the next barrier
    (the next operation's, close's) makes it stable, and until then a
    crash only costs a refcount rebuild."""
    h = state.header
    if h.version < 3:
        return
    h.incompatible_features = with_dirty(h.incompatible_features, dirty)
    write_header_field(state, "incompatible_features")
    if sync or dirty:
        state.barrier()         # barrier: the bit is stable before what relies on it
    update_alloc_fast(state)


def update_alloc_fast(state):
    """Allocating writes may run in C unless lazy refcounts still need the
    dirty bit set first (the Python path does that).  An image that is not
    read-only always has its refcounts loaded (Image._open)."""
    state.alloc_fast = not state.read_only and (not state.lazy_refcounts or is_dirty(state))


def stop_writing(state, why, bit):
    """Refuse further writes (``why``) and set incompatible bit ``bit`` on
    disk (v3; best effort: the write that failed may fail again)."""
    state.read_only = True
    state.alloc_fast = False
    state.read_only_why = why
    h = state.header
    if h.version >= 3 and not h.incompatible_features & bit:
        h.incompatible_features |= bit
        try:
            write_header_field(state, "incompatible_features")
            state.file.sync()
        except OSError:
            pass


def mark_corrupt(state, err):
    """Set the corrupt bit and stop writing (as qemu does)."""
    stop_writing(state, f"image marked corrupt: {err}", hdr.INCOMPAT_CORRUPT)


@contextlib.contextmanager
def steps(state, what):
    """Run the steps of a metadata operation (``what``: its name) after its
    first write.  Should one raise, the image on disk may lie between two of
    them: each is crash-safe, but close must not clear the dirty bit over a
    half-done operation nor write the caches' view of it.  So the image
    stops taking writes for this session and, on v3, keeps (or gets) its
    dirty bit: the next read-write open rebuilds the refcounts and COPIED
    flags (its check -r all, as qemu), as after a crash.  v2 has no dirty bit:
    ``check -r all`` mends what the operation left (leaks at worst)."""
    try:
        yield
    except BaseException as err:
        interrupted(state, what, err)
        raise


def interrupted(state, what, err):
    """Stop writing after ``what`` raised ``err`` part-way; see :func:`steps`."""
    then = ("the image is repaired at its next read-write open" if state.header.version >= 3
            else "repair it with check -r all")
    stop_writing(state, f"{what} failed part-way ({type(err).__name__}: {err}); writes "
                 f"stopped, {then}", hdr.INCOMPAT_DIRTY)


def clear_autoclear(state, keep=0):
    """Auto-clear bits other than ``keep`` (the features this version
    maintains) are cleared before the first write (the spec: a program that
    does not know an auto-clear feature must clear its bit when it modifies
    the image)."""
    if state.header.autoclear_features & ~keep:
        state.header.autoclear_features &= keep
        write_header_field(state, "autoclear_features")
