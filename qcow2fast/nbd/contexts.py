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

from ..errors import InvalidArgumentError
from . import protocol as P

BITMAP_PREFIX = "qemu:dirty-bitmap:"
BASE_ID, DEPTH_ID, FIRST_BITMAP_ID = 0, 1, 2

# A block status reply carries at most this many descriptors per context
# (the protocol lets the server describe less than the requested range).
MAX_DESCRIPTORS = 1 << 16

_HEAD = P.BLOCK_STATUS_REPLY.size     # chunk header and context id

# Descriptors a bitmap's chunk first makes room for in the send buffer
# (8 bytes each: a 4 KiB page); more are counted first.
BITMAP_ROOM = 512

# Namespace queries that list more than one context (qemu's).
NAMESPACES = {"base:": ("base:",), "qemu:": ("qemu:",), BITMAP_PREFIX: (BITMAP_PREFIX,)}


class Contexts:
    """The contexts of one export: ``names`` in the export's order, each
    with its id; ``bitmaps`` are the persistent bitmap names exported."""

    def __init__(self, allocation_depth=True, bitmaps=None):
        self.ids = {P.BASE_ALLOCATION: BASE_ID}
        if allocation_depth:
            self.ids[P.QEMU_ALLOCATION_DEPTH] = DEPTH_ID
        # context name -> (the bitmaps of the layer that has it, its name)
        self.bitmap_sources = {BITMAP_PREFIX + name: (layer.dirty_bitmaps, name)
                               for name, layer in reversed(list((bitmaps or {}).items()))}
        for i, name in enumerate(self.bitmap_sources):
            self.ids[name] = FIRST_BITMAP_ID + i
        self.names = list(self.ids)

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


def send_block_status(chan, export, handle, offset, length, selected, req_one):
    """The reply to NBD_CMD_BLOCK_STATUS of [offset, offset+length): one
    chunk per selected (name, id), in order, DONE on the last, each
    describing the range from its start (possibly less than all of it).
    Whatever can fail (a bitmap gone, an I/O error) runs before any chunk
    is queued, so a failed request gets its error reply alone."""
    sources = export.contexts.bitmap_sources
    chunks = []
    extents = None
    for name, cid in selected:
        if name in sources:
            bitmaps, bitmap = sources[name]
            chunks.append((cid, None, bitmaps.tracker(bitmap)))
            continue
        if extents is None:
            extents = export.image.block_status(offset, length)
        state = _base_allocation if name == P.BASE_ALLOCATION else (
            _allocation_depth if export.qcow2 else _raw_depth)
        chunks.append((cid, _merged(((e.length, state(e)) for e in extents), req_one), None))
    last = len(chunks) - 1
    for i, (cid, descs, tracker) in enumerate(chunks):
        flags = P.NBD_REPLY_FLAG_DONE if i == last else 0
        if tracker is not None:
            _bitmap_chunk(chan, handle, cid, flags, tracker, offset, length, req_one)
            continue
        mv = chan.reserve(_HEAD + 8 * len(descs))
        P.BLOCK_STATUS_REPLY.pack_into(mv, 0, P.NBD_STRUCTURED_REPLY_MAGIC, flags,
                                       P.NBD_REPLY_TYPE_BLOCK_STATUS, handle,
                                       4 + 8 * len(descs), cid)
        for k, (n, state) in enumerate(descs):
            P.BLOCK_DESCRIPTOR.pack_into(mv, _HEAD + 8 * k, n, state)
        chan.commit(_HEAD + 8 * len(descs))


class BitmapAlone:
    """BLOCK_STATUS with one dirty bitmap the only context selected (a
    backup tool's request, hundreds per ``nbdinfo --map``): the reply is
    that bitmap's chunk alone.  On a plain connection the request loop
    leaves these to C (``serve_in_c``)."""
    __slots__ = ("bitmaps", "name", "cid")

    def __init__(self, bitmaps, name, cid):
        self.bitmaps, self.name, self.cid = bitmaps, name, cid

    def __call__(self, chan, handle, offset, length, req_one):
        # (the bitmap looked up per request: it may be removed meanwhile)
        _bitmap_chunk(chan, handle, self.cid, P.NBD_REPLY_FLAG_DONE,
                      self.bitmaps.tracker(self.name), offset, length, req_one)

    def serve_in_c(self, loop, flags):
        """Have ``loop`` (nbdio.RequestLoop) give the same answer in C for
        requests with command ``flags`` allowed; one with more than
        BITMAP_ROOM runs is left to this Python path."""
        loop.serve_bitmap(self.bitmaps.tracker, self.name, self.cid, flags, BITMAP_ROOM,
                          MAX_DESCRIPTORS)


def bitmap_alone(export, selected):
    """A BitmapAlone when ``selected`` is one dirty bitmap, else None."""
    if len(selected) != 1 or selected[0][0] not in export.contexts.bitmap_sources:
        return None
    name, cid = selected[0]
    return BitmapAlone(*export.contexts.bitmap_sources[name], cid)


def _bitmap_chunk(chan, handle, cid, flags, tracker, offset, length, req_one):
    """One dirty bitmap's chunk: its runs (flag 1 dirty) packed in C
    straight into the reply.  Room for BITMAP_ROOM runs first (the usual
    case); when there are more, they are counted and packed again."""
    most = 1 if req_one else MAX_DESCRIPTORS
    room = min(most, BITMAP_ROOM)
    mv = chan.reserve(_HEAD + 8 * room)
    n = tracker.pack_runs(offset, length, mv[_HEAD:], room)
    if n == room < most:
        n = tracker.pack_runs(offset, length, None, most)
        mv = chan.reserve(_HEAD + 8 * n)        # the same place: nothing was committed
        tracker.pack_runs(offset, length, mv[_HEAD:], n)
    P.BLOCK_STATUS_REPLY.pack_into(mv, 0, P.NBD_STRUCTURED_REPLY_MAGIC, flags,
                                   P.NBD_REPLY_TYPE_BLOCK_STATUS, handle, 4 + 8 * n, cid)
    chan.commit(_HEAD + 8 * n)


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
