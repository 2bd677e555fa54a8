"""commit: the data of an image's top layers written into a layer below
(qemu-img commit, which runs qemu's commit-active job).

Every guest range allocated in a layer above the base (data, compressed,
zero clusters, and the zeros past the end of a short intermediate layer)
is read from the layer holding it and written into the base; nothing else
is read or written.  Zero runs are written as zeros that may unmap, as
qemu's commit job writes them (the base's clusters there are freed, their
host space punched: ``qemu-img check`` of the base counts them as qemu's
result does), data in large runs through the base's own write path.  A base smaller than the
top is first grown to its size, as qemu does.  Afterwards the top is
emptied (it then reads as its backing file, which now holds its data)
unless ``drop``; a base given explicitly leaves the top as it is
(qemu-img's ``-b`` implies ``-d``: the layers in between no longer show
what they showed, only the top still does).

Write order: the base is changed only at ranges the top does not read
from it, so the top shows the same data throughout; the base is flushed
(barrier) before the top is emptied, so an interruption at any point
leaves the top's data readable through the chain.  Only the base and
(when emptied) the top are written.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..engine.backing import resolve_backing_path
from ..engine.empty import make_empty
from ..engine.image import Image
from ..errors import InvalidArgumentError, qemu_step
from ..host.lock import take_over
from ..host.raw import RawImage
from ..spec import header as hdr
from ..spec.constants import L1E_SIZE
from . import layers as chainlayers
from .layers import CHUNK
from .ratelimit import paced

if TYPE_CHECKING:
    from collections.abc import Callable



def find_backing_image(top, name):
    """The layer of ``top``'s chain that ``name`` names (qemu's
    bdrv_find_backing_image: relative to the directory of each image in
    turn, compared as real paths), or None."""
    img = top
    while getattr(img, "backing", None) is not None:
        want = os.path.realpath(resolve_backing_path(img.path, name))
        if want == os.path.realpath(img.backing.path):
            return img.backing
        img = img.backing
    return None


def commit(path: str | os.PathLike[str], *, base: str | None = None, drop: bool = False,
           cache: str = "writeback",
           progress: Callable[[int, int], object] | None = None,
           key_secret: bytes | str | None = None, rate_limit: int | None = None) -> None:
    """Write the data of the qcow2 image at ``path`` (and of every layer
    above ``base``) into ``base`` (default: its backing file), then empty
    the image unless ``drop``.  ``base`` is a backing file name as in
    ``qemu-img commit -b`` (relative names are relative to each image's
    directory).  Emptying after committing into a layer below the backing
    file would make the image read the stale layers in between: that
    needs ``drop=True``.  ``progress(done, total)``: bytes committed.
    ``key_secret``: the passphrase of encrypted layers (the chain's).
    ``rate_limit`` (-r): at most that many bytes committed per second on
    average (qemu's job speed)."""
    path = os.fspath(path)
    chainlayers.check_cache_mode(cache)
    with Image(path, "r" if drop else "r+", cache_mode=cache, cache_clean_interval=0,
               key_secret=key_secret) as top:
        if top.backing is None:
            raise InvalidArgumentError("Image does not have a backing file")
        target = top.backing if base is None else find_backing_image(top, base)
        if target is None:
            raise InvalidArgumentError(f"Did not find '{base}' in the backing chain of '{path}'")
        above = chainlayers.chain(top)
        above = above[:above.index(target)]
        if not drop and len(above) > 1:
            raise InvalidArgumentError(
                f"emptying '{path}' after committing into '{base}' would leave it reading the "
                "layers in between, which no longer hold what they held: use drop=True "
                "(qemu-img commit -b implies -d)")
        with qemu_step("Block job failed"):
            _commit_into(top, above, target, cache, progress, paced(rate_limit))
    # The base is stable: the top's data stays readable whatever happens now.
    if not drop:
        with qemu_step("Failed to empty"):
            make_empty(path, cache)



def _commit_into(top, above, target, cache, progress, pace):
    # The chain above holds the base read-only, not sharing write (its
    # locks): the base's writer is that same holder's (host/lock.take_over).
    if isinstance(target, RawImage):
        dest = RawImage(target.path, writable=True, locking=False)
    else:
        dest = Image(target.path, "r+", cache_mode=cache, cache_clean_interval=0,
                     locking=False, key_secret=top.secrets_below(len(above)),
                     blkdebug=target.state.debug)       # (the same filter, its state)
    take_over(dest.file.fd, "raw" if isinstance(target, RawImage) else "qcow2")
    try:
        _grow(dest, top.size)
        total = 0
        if progress is not None:        # (a pass over the chain's metadata)
            total = sum(n for _, _, n in _jobs(top.size, above))
            progress(0, total)
        done = [0]
        writeback = chainlayers.Writeback(dest.file)

        def read(job, bufs):
            layer, off, n = job
            if layer is not None:
                layer.readinto(off, bufs[0][:n])

        def write(job, bufs):
            layer, off, n = job
            if pace is not None:
                pace.admit(n)
            if layer is None:
                dest.write_zeroes(off, n, may_unmap=True)
            else:
                dest.write(off, bufs[0][:n])
                writeback.wrote(n)
            done[0] += n
            if progress is not None:
                progress(done[0], total)

        chainlayers.pipeline(_jobs(top.size, above), read, write, 1, CHUNK)
    finally:
        # Barrier (closing flushes): the committed data and the base's
        # metadata are stable before anything empties the top.
        dest.close()


def _jobs(size, above):
    """(layer, offset, length) of each piece to commit, at most CHUNK bytes
    of data (layer None: zeros, any length)."""
    for w in chainlayers.windows(size):
        for r in chainlayers.resolve(above, *w):
            if r.depth == len(above):
                continue                # not above the base: the base shows it already
            if r.kind == "zero":
                yield None, r.offset, r.length
                continue
            for off in range(r.offset, r.offset + r.length, CHUNK):
                yield above[r.depth], off, min(CHUNK, r.offset + r.length - off)


def _grow(dest, size):
    """A base smaller than the top grows to the top's size (qemu's commit
    does the same).  If the base's own backing file would show through
    the new part, it is zeroed there, as qemu's truncate does."""
    old = dest.size
    if size <= old:
        return
    if isinstance(dest, RawImage):
        dest.grow(size)
        return
    if dest.geo.l1_size_for(size) > hdr.MAX_L1_BYTES // L1E_SIZE:
        raise InvalidArgumentError(f"{dest.path}: size: cannot grow from {old} to {size} bytes "
                                   f"(the top's size) with {dest.cluster_size}-byte clusters: "
                                   "the L1 table would pass qemu's limit")
    dest.resize(size)
    below = dest.backing
    if below is not None and below.size > old:
        dest.write_zeroes(old, min(size, below.size) - old, may_unmap=True)
