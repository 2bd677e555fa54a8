"""The metadata contexts an export offers to NBD_CMD_BLOCK_STATUS
(proto.md "Metadata querying"; qemu docs/interop/nbd.rst), answered as
qemu-nbd 7.2 answers them:

- ``base:allocation``: hole and zero flags, always offered;
- ``qemu:allocation-depth``: 0 unallocated, 1 this image, 2 its backing
  file, ... (qemu-nbd ``-A``);
- ``qemu:dirty-bitmap:NAME``: flag 1 where persistent bitmap NAME is dirty
  (qemu-nbd ``-B NAME``, several allowed).

Context ids are qemu-nbd's: base 0, allocation depth 1, bitmaps from 2 in
the reverse of the order they were given (qemu keeps them in a list it
prepends to).  NBD_OPT_LIST_META_CONTEXT lists everything for no query,
and for a namespace query (``base:``, ``qemu:``, ``qemu:dirty-bitmap:``)
the contexts in it; NBD_OPT_SET_META_CONTEXT selects exact names only.
Both answer in the export's order, not the query's.
"""

import bisect

from ..errors import InvalidArgumentError
from . import protocol as P

BITMAP_PREFIX = "qemu:dirty-bitmap:"
NBD_STATE_DIRTY = 1
BASE_ID, DEPTH_ID, FIRST_BITMAP_ID = 0, 1, 2

# A block status reply carries at most this many descriptors per context
# (the protocol lets the server describe less than the requested range).
MAX_DESCRIPTORS = 1 << 16

# Extents of a read-only bitmap are computed this much of the disk at a time.
WINDOW = 16 << 30

# Namespace queries that list more than one context (qemu's).
NAMESPACES = {"base:": ("base:",), "qemu:": ("qemu:",), BITMAP_PREFIX: (BITMAP_PREFIX,)}


class Contexts:
    """The contexts of one export: ``names`` in the export's order, each
    with its id; ``bitmaps`` are the persistent bitmap names exported."""

    def __init__(self, allocation_depth=True, bitmaps=None):
        self.ids = {P.BASE_ALLOCATION: BASE_ID}
        if allocation_depth:
            self.ids[P.QEMU_ALLOCATION_DEPTH] = DEPTH_ID
        # context name -> the layer whose bitmap it reports
        self.bitmap_layers = {BITMAP_PREFIX + name: layer
                              for name, layer in reversed(list((bitmaps or {}).items()))}
        for i, name in enumerate(self.bitmap_layers):
            self.ids[name] = FIRST_BITMAP_ID + i
        self.names = list(self.ids)
        self._windows = {}          # context name -> (start, end, starts, extents)

    def dirty_extents(self, name, layer, offset, length):
        """The dirty extents of context ``name`` over [offset, offset+length).
        A read-only layer's bitmap cannot change: its extents are computed
        a WINDOW at a time and kept, so a client walking the disk (nbdinfo
        --map) costs a bisect per request, not a pass over the bitmap."""
        bitmap = name[len(BITMAP_PREFIX):]
        if not layer.read_only:
            return layer.dirty_extents(bitmap, offset, length)
        end = offset + length
        window = self._windows.get(name)
        if window is None or not window[0] <= offset <= end <= window[1]:
            stop = min(layer.size, offset + max(length, WINDOW))
            extents = layer.dirty_extents(bitmap, offset, stop - offset)
            window = (offset, stop, [e[0] for e in extents], extents)
            self._windows[name] = window        # one assignment: safe between threads
        _, _, starts, extents = window
        out = extents[max(0, bisect.bisect_right(starts, offset) - 1):
                      bisect.bisect_left(starts, end)]
        if out:                     # clip the first and the last to the request
            off, n, dirty = out[0]
            out[0] = (offset, off + n - offset, dirty)
            off, n, dirty = out[-1]
            out[-1] = (off, end - off, dirty)
        return out

    def listed(self, queries):
        """NBD_OPT_LIST_META_CONTEXT: the names answering any of ``queries``
        (all of them for none)."""
        if not queries:
            return list(self.names)
        prefixes = [q for q in queries if q in NAMESPACES]
        exact = set(queries)
        return [n for n in self.names
                if n in exact or any(n.startswith(p) for p in prefixes)]

    def selected(self, queries):
        """NBD_OPT_SET_META_CONTEXT: [(name, id)] for the exact names asked."""
        exact = set(queries)
        return [(n, self.ids[n]) for n in self.names if n in exact]


def find_bitmaps(image, names):
    """{name: layer} for the persistent bitmaps to export, each found in
    the image or, failing that, the nearest backing layer that has it (as
    qemu-nbd looks for them); qemu-nbd's errors for a missing or
    inconsistent (in use at open: a crash) bitmap."""
    found = {}
    for name in names:
        layer = image
        while layer is not None:
            bitmap = next((b for b in getattr(layer, "bitmaps", ()) if b.name == name), None)
            if bitmap is not None:
                break
            layer = layer.backing
        if bitmap is None:
            raise InvalidArgumentError(f"Bitmap '{name}' is not found")
        if bitmap.inconsistent:
            raise InvalidArgumentError(f"Bitmap '{name}' is inconsistent and cannot be used")
        found[name] = layer
    return found


def descriptors(export, offset, length, selected, req_one):
    """For each selected (name, id): (id, [[length, flags], ...]) describing
    [offset, offset+length) from its start (possibly less than all of it)."""
    image = export.image
    layers = export.contexts.bitmap_layers
    extents = None
    out = []
    for name, cid in selected:
        if name in layers:
            # dirty_extents alternates dirty and clean: nothing to merge
            dirty = export.contexts.dirty_extents(name, layers[name], offset, length)
            out.append((cid, [[n, NBD_STATE_DIRTY if d else 0] for _, n, d in
                              dirty[:1 if req_one else MAX_DESCRIPTORS]]))
            continue
        if extents is None:
            extents = image.block_status(offset, length)
        state = _base_allocation if name == P.BASE_ALLOCATION else (
            _allocation_depth if export.qcow2 else _raw_depth)
        out.append((cid, _merged(((e.length, state(e)) for e in extents), req_one)))
    return out


def _merged(runs, req_one):
    """Neighbours with the same flags joined; at most one descriptor with
    REQ_ONE, MAX_DESCRIPTORS otherwise."""
    descs = []
    for n, flags in runs:
        if descs and descs[-1][1] == flags:
            descs[-1][0] += n
        elif descs and (req_one or len(descs) == MAX_DESCRIPTORS):
            break
        else:
            descs.append([n, flags])
    return descs


def _base_allocation(e):
    """Data (and compressed data) is allocated; zero clusters and
    unallocated ranges (through the whole chain) read as zeros and are holes."""
    if e.kind in ("zero", "unallocated"):
        return P.NBD_STATE_HOLE | P.NBD_STATE_ZERO
    return 0


def _allocation_depth(e):
    """qemu:allocation-depth: 0 unallocated in the whole chain, 1 this
    image, 2 its backing file, ..."""
    return 0 if e.kind == "unallocated" else e.depth + 1


def _raw_depth(e):
    return 1        # a raw file has one layer, and all of it is "allocated"
