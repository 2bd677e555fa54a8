"""A backing chain as commit and rebase walk it (qemu's
bdrv_block_status_above over a given part of the chain): the open layers,
top first, and which of them each guest range resolves to.

Resolution is by extents, a layer at a time: a range unallocated in one
layer is asked of the next, so the cost is the metadata of the layers
walked, never their data.  As in qemu, the part of a range past the end
of a layer reads as zeros *from that layer* (it is resolved there and not
below).
"""

import mmap
import os
import queue
import threading
from typing import NamedTuple

from .._ext.state import CACHE_MODES
from ..errors import InvalidArgumentError

ZERO_KINDS = ("zero", "unallocated")
CHUNK = 4 << 20         # bytes read (and written) per call
WRITEBACK_STEP = 32 << 20   # bytes copied between writeback hints (Writeback)
WINDOW = 1 << 30        # guest bytes resolved at a time (bounds the run lists; a
                        # multiple of every cluster size)


class Run(NamedTuple):
    offset: int
    length: int
    kind: str        # "data", "compressed", "zero", or "unallocated" (in none of the layers)
    depth: int       # index of the layer holding it (len(layers) when unallocated)


def chain(img):
    """``img`` and every image below it, top first."""
    out = []
    while img is not None:
        out.append(img)
        img = getattr(img, "backing", None)
    return out


def layer_status(layer, offset, length):
    """One layer's own extents: a qcow2 layer's mapping, a raw file's data
    and holes (holes read as zeros)."""
    own = getattr(layer, "layer_status", None)
    return own(offset, length) if own is not None else layer.block_status(offset, length)


def windows(size):
    """(offset, length) of the WINDOW-sized pieces of [0, size)."""
    return [(a, min(WINDOW, size - a)) for a in range(0, size, WINDOW)]


def resolve(layers, offset, length):
    """The runs of [offset, offset+length) as ``layers`` (top first) show
    it: each piece with the layer it comes from, or "unallocated" where
    none of them holds it.  Iterative (a stack of each layer's pieces, in
    guest order), so any depth resolves without recursion."""
    out = []
    n = len(layers)
    stack = [iter([(0, offset, offset + length)])]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, Run):
            _append(out, item)
        elif item[0] == n:
            _, start, end = item
            _append(out, Run(start, end - start, "unallocated", n))
        else:
            stack.append(iter(_pieces(layers[item[0]], *item)))
    return out


def _pieces(layer, depth, start, end):
    """Layer ``depth``'s view of [start, end): its own runs, the ranges it
    leaves to the layers below ((depth + 1, start, end)), and zeros past
    its end (resolved here)."""
    out = []
    lim = min(end, layer.size)
    if lim > start:
        for e in layer_status(layer, start, lim - start):
            if e.kind == "unallocated":
                out.append((depth + 1, e.offset, e.offset + e.length))
            else:
                out.append(Run(e.offset, e.length, e.kind, depth))
    if lim < end:
        out.append(Run(max(lim, start), end - max(lim, start), "zero", depth))
    return out


def _append(out, run):
    if out:
        p = out[-1]
        if p.kind == run.kind and p.depth == run.depth and p.offset + p.length == run.offset:
            out[-1] = p._replace(length=p.length + run.length)
            return
    out.append(run)


def identity(layer):
    """What makes two opened layers the same data: the file, and how it is
    read (a qcow2 image or raw bytes)."""
    return os.path.realpath(layer.path), getattr(layer, "header", None) is None


def read_view(layer, offset, buf):
    """What ``layer`` (an image, or None for no backing file) shows at
    [offset, offset+len(buf)): zeros without one and past its end."""
    n = len(buf)
    k = 0 if layer is None else max(0, min(n, layer.size - offset))
    if k:
        layer.readinto(offset, buf[:k])
    if k < n:
        buf[k:] = bytes(n - k)


def check_cache_mode(mode):
    """qemu-img's -t / -T check, with its message."""
    if mode not in CACHE_MODES:
        raise InvalidArgumentError(f"Invalid cache option: {mode}")


class Writeback:
    """Has the device start writing a file's dirty pages every
    WRITEBACK_STEP bytes copied into it, so that the copy and the disk
    work at the same time and the closing barrier has little left to
    wait for (a hint: it orders nothing)."""

    def __init__(self, file):
        self.file = file
        self.pending = 0

    def wrote(self, n):
        self.pending += n
        if self.pending >= WRITEBACK_STEP:
            self.pending = 0
            self.file.start_writeback()


def pipeline(jobs, read, consume, nbufs, size):
    """Run ``read(job, bufs)`` for each job in a helper thread, ahead of
    ``consume(job, bufs)`` in this one (both release the GIL in their I/O,
    so reading the chain overlaps writing the image).  Each job gets a
    set of buffers (a list of ``nbufs`` page-aligned ``size``-byte
    memoryviews) that is reused once consumed.  An error on either side
    stops both and is raised here."""
    free = queue.Queue()
    for _ in range(2):
        free.put([memoryview(mmap.mmap(-1, size)) for _ in range(nbufs)])
    ready = queue.Queue()
    stop = threading.Event()

    def reader():
        try:
            for job in jobs:
                bufs = free.get()
                if stop.is_set():
                    return
                read(job, bufs)
                ready.put((job, bufs))
            ready.put(None)
        except BaseException as e:     # handed to the consumer
            ready.put(e)

    t = threading.Thread(target=reader, name="qcow2fast-chain-reader", daemon=True)
    t.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            consume(*item)
            free.put(item[1])
    finally:
        stop.set()
        free.put(None)
        t.join()
