"""rebase: change an image's backing file (qemu-img rebase).

Safe mode keeps what the image shows: every range the image does not
hold itself is compared between the old backing chain and the new one,
and where they differ the old chain's data is written into the image,
so it no longer depends on the backing file there.  Ranges that both
chains resolve to zeros, or to the same layer (the same file read the
same way: a common base, or the new backing file being a layer of the
old chain, qemu's "prefix chain" case), are equal without being read.
The rest is read in large runs from both chains and compared per
allocation unit of the image (a cluster, or a subcluster); a unit that
differs gets the old chain's data (zeros as zeros).  A chain shorter than
the image shows zeros past its end; no new backing file (``backing=""``)
shows zeros everywhere, which makes the image stand alone.

Unsafe mode (``unsafe=True``, ``-u``) only rewrites the header's backing
file name and format; the old backing file need not exist.

Write order: while the data is copied the header still names the old
backing file, and the image only gains clusters holding what it already
showed, so it shows the same data throughout.  The image is flushed
(barrier) before the header is rewritten (one write of the header
cluster, as qemu does, then a barrier).  Nothing but the image is written.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .._ext.fileio import File
from .._ext.kernels import differing_units, nonzero_units
from ..engine.backing import probe_format, qemu_name, resolve_backing_path
from ..engine.image import Image
from ..errors import (CorruptImageError, ImageLockedError, InvalidArgumentError, Qcow2Error,
                      UnsupportedFeatureError)
from ..host.raw import RawImage
from ..spec import header as hdr
from . import layers as chainlayers
from .layers import CHUNK
from .options import QEMU_DRIVERS

if TYPE_CHECKING:
    from collections.abc import Callable

BACKING_FORMATS = ("qcow2", "raw")
# rebase -u writes any block driver name qemu-img knows (QEMU_DRIVERS) as the
# backing format, as qemu-img does; a safe rebase opens the new backing file,
# which must be qcow2 or raw.
QEMU_FORMATS = BACKING_FORMATS + QEMU_DRIVERS


def rebase(path: str | os.PathLike[str], backing: str | None, *,
           backing_fmt: str | None = None, unsafe: bool = False, cache: str = "writeback",
           backing_cache: str = "writeback",
           progress: Callable[[int, int], object] | None = None,
           key_secret: bytes | str | None = None, force_share: bool = False) -> None:
    """Make ``backing`` (a name as stored in the header: relative names are
    relative to the image's directory; "" or None for none) the backing
    file of the qcow2 image at ``path``, of format ``backing_fmt`` (qcow2
    or raw; required with a backing file, as qemu-img requires -F).
    ``cache`` is the image's cache mode, ``backing_cache`` the backing
    chains'.  ``progress(done, total)``: guest bytes examined.
    ``key_secret``: the passphrase of encrypted images in both chains.
    ``force_share`` (-U): the new backing chain is read while another
    program writes it."""
    path = os.fspath(path)
    backing = backing or None
    for mode in (cache, backing_cache):
        chainlayers.check_cache_mode(mode)
    if backing is not None and backing_fmt is None:
        if not unsafe:      # qemu-img opens (probes) the new backing file first
            where = resolve_backing_path(path, backing)
            probed = probe_format(where) if os.path.exists(where) else "qcow2"
            _open_new_backing(path, backing, probed, backing_cache, key_secret,
                              force_share).close()
        raise InvalidArgumentError(f"Could not change the backing file to '{backing}': "
                                   "backing format must be specified")
    if backing is None:
        backing_fmt = None
    elif backing_fmt not in QEMU_FORMATS:
        raise InvalidArgumentError(f"Invalid format name: '{backing_fmt}'")
    elif backing_fmt not in BACKING_FORMATS and not unsafe:
        raise UnsupportedFeatureError(f"backing format '{backing_fmt}' is not supported "
                                      f"(supported: {', '.join(BACKING_FORMATS)})",
                                      feature="backing format")
    if len((backing or "").encode()) > hdr.MAX_BACKING_FILE_SIZE or "\0" in (backing or ""):
        raise InvalidArgumentError(f"Could not change the backing file to '{backing}': "
                                   "Invalid argument")
    # -u writes the name only, as qemu-img does even when it names the image
    # itself (the chain is not opened; info and open then say it loops).
    with Image(path, "r+", cache_mode=cache, backing=not unsafe,
               cache_clean_interval=0, key_secret=key_secret, no_io=unsafe) as img:
        if not unsafe:
            new = _open_new_backing(path, backing, backing_fmt, backing_cache,
                                    img.secrets_below(1), force_share)
            try:
                _copy_differences(img, new, progress)
            finally:
                if new is not None:
                    new.close()
    # Barrier (closing flushed the image): every cluster that differs is
    # stable in the image before its header names the new backing file.
    change_backing_file(path, backing, backing_fmt, sync=cache != "unsafe")


def _open_new_backing(path, backing, fmt, cache, key_secret=None, force_share=False):
    if backing is None:
        return None
    where = resolve_backing_path(path, backing)

    def open_new(**kw):
        kw.setdefault("force_share", force_share)
        return RawImage(where, **kw) if fmt == "raw" else Image(
            where, "r", cache_mode=cache, cache_clean_interval=0, key_secret=key_secret, **kw)
    try:
        new = open_new()
    except ImageLockedError as e:
        # The image itself, open for writing here, in the new chain holds
        # its locks: a loop, said as one (looked at without locks).
        probe = open_new(locking=False)
        _refuse_loop(path, backing, [layer.path for layer in chainlayers.chain(probe)],
                     probe.close)
        probe.close()
        raise InvalidArgumentError(f"Could not open new backing file '{backing}': {e}") from e
    except (OSError, Qcow2Error) as e:
        why = (f"Could not open '{qemu_name(path, backing)}': {e.strerror}"
               if isinstance(e, OSError) else e)
        raise InvalidArgumentError(f"Could not open new backing file '{backing}': {why}") from e
    _refuse_loop(path, backing, [layer.path for layer in chainlayers.chain(new)], new.close)
    return new


def _refuse_loop(path, backing, chain_paths, cleanup=lambda: None):
    """The image must not end up in its own backing chain."""
    me = os.path.realpath(path)
    for p in chain_paths:
        if os.path.realpath(p) == me:
            cleanup()
            raise CorruptImageError(
                f"Could not open new backing file '{backing}': the backing chain would loop "
                f"({p} is the image itself)", offset=hdr.FIELD_OFFSET["backing_file_offset"],
                field="backing_file")


def _copy_differences(img, new, progress):
    old_layers = chainlayers.chain(img.backing)
    new_layers = chainlayers.chain(new)
    unit = img.geo.subcluster_size
    tops = (old_layers[0] if old_layers else None, new_layers[0] if new_layers else None)
    size = img.size
    if progress is not None:
        progress(0, size)

    def read(job, bufs):
        off, n, old_zero, new_zero, _ = job
        for buf, layer, zero in zip(bufs, tops, (old_zero, new_zero)):
            if n and not zero:
                chainlayers.read_view(layer, off, buf[:n])

    writeback = chainlayers.Writeback(img.file)

    def write(job, bufs):
        writeback.wrote(_copy_chunk(img, job, unit, bufs))
        if progress is not None and job[4] is not None:
            progress(job[4], size)

    chainlayers.pipeline(_jobs(img, old_layers, new_layers, unit), read, write, 2, CHUNK)


def _jobs(img, old_layers, new_layers, unit):
    """(offset, length, old reads zeros, new reads zeros, progress mark) of
    each chunk to compare; a mark alone (length 0) after each hole and
    window.  The
    chains are resolved a window at a time, then cut to the ranges the
    image does not hold itself."""
    ids = ([chainlayers.identity(layer) for layer in old_layers],
           [chainlayers.identity(layer) for layer in new_layers])
    size = img.size
    for w, n in chainlayers.windows(size):
        holes = [e for e in img.layer_status(w, n) if e.kind == "unallocated"]
        todo = _unequal(chainlayers.resolve(old_layers, w, n),
                        chainlayers.resolve(new_layers, w, n), *ids) if holes else []
        k = 0
        for h in holes:
            lo, hi = h.offset, h.offset + h.length
            while k < len(todo) and todo[k][1] <= lo:
                k += 1
            segs = []
            for a, b, old_zero, new_zero in todo[k:]:
                if a >= hi:
                    break
                segs.append((max(a, lo), min(b, hi), old_zero, new_zero))
            for a, b, old_zero, new_zero in _round_out(segs, unit, lo, hi):
                for off in range(a, b, CHUNK):
                    yield off, min(CHUNK, b - off), old_zero, new_zero, None
            yield hi, 0, True, True, hi
        yield w + n, 0, True, True, w + n


def _unequal(old_runs, new_runs, old_ids, new_ids):
    """The segments (a, b, old reads zeros, new reads zeros) where the two
    chains' resolutions do not prove the data equal (both zeros, or both
    from the same layer)."""
    out = []
    i = j = 0
    while i < len(old_runs) and j < len(new_runs):
        o, n = old_runs[i], new_runs[j]
        a = max(o.offset, n.offset)
        b = min(o.offset + o.length, n.offset + n.length)
        zeros = (o.kind in chainlayers.ZERO_KINDS, n.kind in chainlayers.ZERO_KINDS)
        same = all(zeros) or (not any(zeros) and o.kind == n.kind
                              and old_ids[o.depth] == new_ids[n.depth])
        if not same and b > a:
            if out and out[-1][1] == a and out[-1][2:] == zeros:
                out[-1] = (out[-1][0], b, *zeros)
            else:
                out.append((a, b, *zeros))
        if o.offset + o.length == b:
            i += 1
        if n.offset + n.length == b:
            j += 1
    return out


def _round_out(segments, unit, lo, hi):
    """``segments`` widened to whole units, clipped to [lo, hi), merged; a
    side is known to read zeros only where no widening or merging made
    that unsure."""
    out = []
    for a, b, old_zero, new_zero in segments:
        wa, wb = max(lo, a - a % unit), min(hi, -(-b // unit) * unit)
        if (wa, wb) != (a, b):
            old_zero = new_zero = False
        if out and out[-1][1] >= wa:
            p = out[-1]
            out[-1] = (p[0], max(p[1], wb), p[2] and old_zero, p[3] and new_zero)
        else:
            out.append((wa, wb, old_zero, new_zero))
    return out


def _copy_chunk(img, job, unit, bufs):
    """Compare one chunk (whole units but at the disk's end) of the two
    chains, read into ``bufs`` (a side known to read zeros is not read);
    where a run of units differs, write what the old chain shows.
    Returns the bytes written."""
    off, n, old_zero, new_zero, _ = job
    if not n:
        return 0
    units = -(-n // unit)
    whole = units * unit
    for buf, zero in zip(bufs, (old_zero, new_zero)):
        if whole > n and not zero:
            buf[n:whole] = bytes(whole - n)     # a last partial unit: padded with zeros
    differ = bytearray(units)
    if not (old_zero or new_zero):
        differing_units(bufs[0], bufs[1], unit, differ)
    else:           # one side zeros: units differ where the other is not
        nonzero_units(bufs[1] if old_zero else bufs[0], unit, differ)
    written = 0
    s = differ.find(1)
    while s >= 0:
        e = differ.find(0, s)
        e = units if e < 0 else e
        lo, hi = s * unit, min(n, e * unit)
        if old_zero or (not new_zero and not _any_nonzero(bufs[0][lo:e * unit])):
            img.write_zeroes(off + lo, hi - lo)
        else:
            img.write(off + lo, bufs[0][lo:hi])
            written += hi - lo
        s = differ.find(1, e)
    return written


def _any_nonzero(buf):
    one = bytearray(1)
    nonzero_units(buf, len(buf), one)
    return one[0] != 0


def change_backing_file(path, backing, backing_fmt, *, sync=True):
    """Rewrite the header of the (closed) qcow2 image at ``path`` to name
    ``backing`` (None: no backing file) of format ``backing_fmt`` (qemu's
    qcow2_change_backing_file: the header cluster written whole)."""
    f = File(path, writable=True)
    try:
        file_size = f.size()
        h = hdr.read_header(f, file_size)
        h.backing_file, h.backing_format = backing, backing_fmt
        try:
            head = h.pack()
        except UnsupportedFeatureError:
            raise InvalidArgumentError(f"Could not change the backing file to '{backing}': No "
                                       "space left in the file header") from None
        f.pwrite(head.ljust(h.cluster_size, b"\0"), 0)
        if sync:
            f.sync()            # barrier: the new header is stable when rebase returns
    finally:
        f.close()
