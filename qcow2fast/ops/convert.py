"""Converting images (qemu-img convert): raw/qcow2 sources, possibly several
concatenated or a raw stream on stdin, into a new qcow2 or raw image, a file
or a stream (stdout).

The guest disk is cut into *units* (the destination's cluster for qcow2,
the sparse size for raw) and processed in batches of units on a thread
pool: read (only units that hold data, from the sources' block status:
sources.py),
zero detection (qemu's -S), compression.  Batches are placed in the output
in order by the calling thread and written by one writer thread; at most
``2 * threads`` batches are processed and as many written at a time, so
memory stays bounded.  A new qcow2 image is laid out by qcow2_writer (data first,
metadata computed at the end); an existing target (-n), extended L2 entries
and preallocated images go through Image.write (and, compressed,
Image.write_compressed_clusters).

A new destination file is written under a temporary name in the same
directory and renamed over ``dest`` only once complete, so a failed or
interrupted conversion leaves no half-written image behind.
"""

from __future__ import annotations

import collections
import logging
import concurrent.futures
import os
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

from ..spec import header as hdr
from ..host import file as hostfile
from .._ext.fileio import File
from ..engine.compress import Compressor
from .create import create
from .options import image_size, validate_options
from ..engine.backing import resolve_backing_path
from ..errors import ConvertError, InvalidArgumentError, Qcow2Error, UnsupportedFeatureError
from ..spec.constants import COMPRESSED, DATA, L1E_SIZE, UNALLOCATED, ZERO, whole_sectors
from .qcow2_writer import Qcow2Writer, runs
from ..engine.crypto_setup import target_secret
from ..host.limits import fit_threads
from ..host.lock import check_create
from .convert_units import Buffers, Job
from .ratelimit import paced
from .convert_output import Output
from .nbd_target import is_nbd_name, is_remote_target
from .sources import MUST_ZERO, READ, SKIP, UnitMarks, open_sources

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any

    from ..host.device import BlockDevice

BATCH_BYTES = 2 << 20           # as qemu-img convert's requests; 4 MiB measured slower
STDIN = "-"
# -- the pipeline ------------------------------------------------------------------------


def run_pipeline(job, batches, sink, threads, progress, total, buffers):
    """Process ``batches`` (an iterator of (buf, nvalid, marks, src, first))
    on a pool; hand results to ``sink(first, kinds, payloads, buf, nvalid)``
    in order.  The sink decides where the data goes and returns the I/O to
    do (a callable, run in order on a writer thread) or None.  At most
    ``2 * threads`` batches are being processed and as many being written."""
    window = max(2, 2 * threads)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads,
                                                 thread_name_prefix="qcow2fast-convert")
    # One writer thread: writes to one file serialise on its inode lock
    # anyway (several writers only spin on it), and stay in file order.
    wpool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="qcow2fast-write")
    pending, writes = collections.deque(), collections.deque()
    done = 0

    def retire_write():
        fut, buf = writes.popleft()
        fut.result()
        buffers.put(buf)

    try:
        it = iter(batches)
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                b = next(it, None)
                if b is None:
                    exhausted = True
                    break
                pending.append((b, pool.submit(job.process, *b)))
            if not pending:
                break
            (buf, nvalid, marks, src, first), fut = pending.popleft()
            kinds, payloads, notes = fut.result()
            for note in notes:                  # (--salvage: in disk order)
                src.salvage(note)
            io = sink(first, kinds, payloads, buf, nvalid)
            if io is not None and job.pace is not None:     # -r: the bytes it writes
                io = _paced(io, job.pace, int(np.count_nonzero(kinds != UNALLOCATED)) * job.unit)
            if io is None:
                buffers.put(buf)
            else:
                writes.append((wpool.submit(io), buf))
            while writes and (len(writes) > window or writes[0][0].done()):
                retire_write()
            done = first * job.unit + nvalid        # batches come in disk order
            if progress is not None:
                progress(done, total)
        while writes:
            retire_write()
        if progress is not None and total is not None and done < total:
            progress(total, total)              # the empty tail was skipped
    finally:
        for fut in [f for _, f in pending] + [f for f, _ in writes]:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        wpool.shutdown(wait=True, cancel_futures=True)
    return done


def _paced(io, pace, nbytes):
    def write():
        pace.admit(nbytes)      # (on the writer thread: the writes behind it wait)
        io()
    return write


def seekable_batches(src, marks, unit, buffers):
    """Batches in disk order; batches with nothing to do (all SKIP) are
    left out, so a sparse disk costs nothing where it is empty."""
    per = buffers.nbytes // unit
    for first in range(0, marks.count, per):
        m = marks.get(first, min(per, marks.count - first))
        if not m.any():
            continue
        nvalid = min(len(m) * unit, src.size - first * unit)
        yield buffers.get(), nvalid, m, src, first


def stream_batches(fd, unit, state, buffers):
    """Batches read from a stream (stdin) in the calling thread;
    ``state['size']`` counts the bytes read."""
    first = 0
    while True:
        buf = buffers.get()
        mv, got = memoryview(buf), 0
        while got < len(mv):
            n = os.readv(fd, [mv[got:]])
            if n == 0:
                break
            got += n
        if got == 0:
            return
        state["size"] += got
        count = -(-got // unit)
        yield buf, got, np.full(count, READ, np.uint8), None, first
        first += count
        if got < len(mv):
            return


# -- destinations ---------------------------------------------------------------------------


def convert(sources: str | os.PathLike[str] | BlockDevice
            | Iterable[str | os.PathLike[str] | BlockDevice],
            dest: str | os.PathLike[str], *, source_format: str | None = None,
            format: str = "qcow2", options: Mapping[str, Any] | None = None,
            compress: bool = False, sparse_size: int = 4096, backing_file: str | None = None,
            backing_format: str | None = None, existing: bool = False,
            target_is_zero: bool = False, threads: int | None = None,
            progress: Callable[[int, int | None], object] | None = None, sync: bool = False,
            direct: bool = False, snapshot: str | Mapping[str, str | None] | None = None,
            compression_level: int | None = None, force_share: bool = False,
            untrusted: bool = False, key_secret: bytes | str | None = None,
            remote: Mapping[str, Any] | None = None,
            target_key_secret: bytes | str | None = None,
            target_open: Mapping[str, Any] | None = None, salvage: bool = False,
            warn: Callable[[str], object] | None = None, rate_limit: int | None = None) -> None:
    """Convert ``sources`` (paths, or open block devices such as an
    :class:`~qcow2fast.Image`, read as they are and left open; several are
    concatenated; ``"-"`` alone is a raw stream on stdin) into ``dest`` (a
    path, or ``"-"`` for stdout).

    The options mean what qemu-img convert's do: ``format`` is -O,
    ``options`` -o (create()'s keyword arguments), ``compress`` -c,
    ``sparse_size`` -S (0: fully allocated output), ``backing_file`` -B
    (only the sources' top layer is copied), ``existing`` -n,
    ``target_is_zero`` --target-is-zero, ``threads`` -m, ``snapshot`` -l (an
    id-or-name, or {"id": ..., "name": ...}, as :func:`qcow2fast.open` takes
    it).  ``compression_level`` (not in qemu-img) trades speed for size with
    ``compress``: zlib 1-9 (default 5, see compress.ZLIB_DEFAULT_LEVEL), zstd
    1-22 (default 3, qemu's).  ``progress`` is
    called as ``progress(done_bytes, total_bytes)`` after each batch, with
    ``done`` increasing up to ``total`` (None when reading stdin).  ``sync``
    makes the output durable (fsync) before it is renamed into place;
    qemu-img convert does not sync by default (cache mode unsafe) and
    neither does this.  ``direct`` writes the output with O_DIRECT,
    bypassing the host page cache, as qemu-img convert -t none does.
    ``force_share`` (-U) reads sources other processes write;
    ``untrusted`` opens them as :func:`qcow2fast.open` does with it;
    ``key_secret`` is the passphrase of encrypted sources; ``remote`` the
    options of remote sources (:func:`qcow2fast.open`'s).  An encrypted
    target: ``options={"encrypt": {...}}`` (create()'s); an existing one
    (``existing``) is opened with ``target_key_secret`` and the other
    keyword arguments of :class:`~qcow2fast.Image` in ``target_open``.  ``salvage``
    (--salvage): a sector of the sources that cannot be read is written as
    zeros, and ``warn(message)`` (default: the "qcow2fast" logger) told
    qemu-img's warning for it.  ``rate_limit`` (-r): at most that many bytes
    written per second on average.
    """
    options = dict(options or {})
    if isinstance(sources, (str, os.PathLike)) or hasattr(sources, "readinto"):
        sources = [sources]
    sources = [os.fspath(s) if isinstance(s, (str, os.PathLike)) else s for s in sources]
    dest = os.fspath(dest)
    # Under an address-space limit (prlimit --as) fewer threads than asked.
    threads = fit_threads(threads or os.cpu_count() or 1)
    if not sources:
        raise InvalidArgumentError("convert: no source image")
    if format not in ("qcow2", "raw"):
        raise InvalidArgumentError(f"unknown or unsupported output format {format!r}")
    if sparse_size < 0 or sparse_size % 512:
        raise InvalidArgumentError(f"sparse size {sparse_size} must be a multiple of 512")
    if target_key_secret is not None and not existing:
        raise InvalidArgumentError("target_key_secret is for an existing target (-n); a new "
                                   "one takes options={'encrypt': {...}}")
    if target_is_zero and not existing:
        raise InvalidArgumentError("--target-is-zero requires -n (an existing target)")
    if compress and format != "qcow2":
        raise InvalidArgumentError("compression is not supported for the raw format")
    if compression_level is not None and not compress:
        raise InvalidArgumentError("a compression level needs compression (-c)")
    if backing_file and format != "qcow2" and not existing:
        raise InvalidArgumentError("a backing file (-B) needs a qcow2 target")
    if backing_file and len(sources) > 1:
        raise InvalidArgumentError("having a backing file for the target makes no sense "
                                   "when concatenating several sources")
    if format == "raw" and options:
        raise InvalidArgumentError(f"invalid parameter {next(iter(options))!r} for format raw")
    stdin = sources == [STDIN]
    if STDIN in sources and not stdin:
        raise InvalidArgumentError("stdin ('-') can only be the only source")
    if dest == STDIN and (format != "qcow2" or existing):
        raise UnsupportedFeatureError("only a new qcow2 image can be written to stdout")
    if is_nbd_name(dest) and format == "qcow2" and not existing and (any(
            options.get(k) for k in ("extended_l2", "data_file", "encrypt"))
            or options.get("preallocation", "off") != "off"):
        raise UnsupportedFeatureError("a new qcow2 image in an NBD export has no extended_l2, "
                                      "data_file, encryption or preallocation")
    if direct and (dest == STDIN or is_remote_target(dest)):
        raise InvalidArgumentError("O_DIRECT output (cache mode none) needs a file target, "
                                   f"not {'stdout' if dest == STDIN else 'a remote one'}")
    if stdin and existing:
        raise InvalidArgumentError("-n needs a source of known size")

    if stdin and snapshot is not None:
        raise InvalidArgumentError("a snapshot (-l) cannot be read from stdin")
    if dest != STDIN and not existing and not is_remote_target(dest):
        check_create(dest)          # not over an image someone uses (qemu's create)
    src = None if stdin else open_sources(sources, source_format, snapshot,
                                          force_share=force_share, untrusted=untrusted,
                                          key_secret=key_secret, remote=remote)
    if salvage and src is not None:
        src.salvage = warn or logging.getLogger("qcow2fast").warning
    try:
        size = src.size if src is not None else None
        # Extended L2 entries, external data files and encryption are not
        # laid out by qcow2_writer: such images go through create() and
        # Image.write (encryption through the image's data transform).
        if format == "qcow2" and not existing and not options.get("extended_l2") \
                and not options.get("data_file") and not options.get("encrypt"):
            st = validate_options(dest if dest != STDIN else "stdout", size,
                                  backing_file=backing_file, backing_format=backing_format,
                                  size_known=not stdin, **options)
            if st.preallocation == "off":
                compressor = _compressor(st.compression_type, compression_level) \
                    if compress else None
                return _convert_new_qcow2(st, src, dest, compressor, sparse_size, threads,
                                          progress, sync, direct, paced(rate_limit))
            if compress or dest == STDIN or stdin or is_nbd_name(dest):
                raise InvalidArgumentError("preallocation cannot be combined with "
                                           "compression or streams")
        # -n -B: the target's backing file is taken to hold what the source's
        # does; only the source's top layer is copied (qemu's target_has_backing)
        return _convert_through_image(src, dest, format, options, sparse_size, existing,
                                      target_is_zero, threads, progress, sync, direct,
                                      (compression_level,) if compress else None,
                                      target_key_secret or target_secret(options),
                                      top_only=bool(backing_file), target_open=target_open,
                                      pace=paced(rate_limit))
    finally:
        if src is not None:
            src.close()


def _backing_size(st, dest):
    """The size of the new image's backing file; None if it has none or it
    cannot be told (then zeros are written all along, as qemu)."""
    if not st.backing_file:
        return None
    try:
        return image_size(resolve_backing_path(dest, st.backing_file), st.backing_format)
    except (OSError, Qcow2Error):
        return None


def _pow2floor(n):
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def _compressor(compression_type, level):
    try:
        return Compressor(compression_type, level)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None


def _feed(job, src, marks, sink, threads, progress):
    """Run the pipeline over ``src`` (stdin when None); returns the guest
    size (for stdin, the bytes read), rounded up to 512 as qemu sizes are."""
    unit = job.unit
    buffers = Buffers(max(1, BATCH_BYTES // unit) * unit)
    if src is None:
        state = {"size": 0}
        run_pipeline(job, stream_batches(sys.stdin.buffer.fileno(), unit, state, buffers),
                     sink, threads, progress, None, buffers)
        return whole_sectors(state["size"])
    run_pipeline(job, seekable_batches(src, marks, unit, buffers), sink, threads, progress,
                 src.size, buffers)
    return whole_sectors(src.size)


def _open_direct(path):
    """The output again, with O_DIRECT (qemu-img convert -t none)."""
    try:
        return File(path, writable=True, direct=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot open the target with O_DIRECT (cache mode none): "
                      f"{e.strerror}", path) from None


def _convert_new_qcow2(st, src, dest, compressor, sparse_size, threads, progress, sync,
                       direct, pace=None):
    geo = st.geometry()
    cs = geo.cluster_size
    job = Job(cs, detect_zeros=sparse_size > 0, keep_zero=bool(st.backing_file),
              compress=compressor, v2_zero_as_data=st.version == 2,
              sparse_units=1 if compressor else max(1, _pow2floor(sparse_size) // cs),
              pace=pace)
    out = Output(dest, in_place=False, stream=True)
    ok = False
    writer = dfile = None
    try:
        dfile = _open_direct(out.path) if direct else None
        writer = Qcow2Writer(st, out.fd, stream=out.stream,
                             spool_dir=os.path.dirname(os.path.abspath(dest))
                             if not out.stream else None, direct=dfile, name=dest)

        def sink(first, kinds, payloads, buf, nvalid):
            return writer.append(first, kinds, payloads, buf)

        marks = None
        if src is not None:
            marks = UnitMarks(src, cs, top_only=bool(st.backing_file),
                              skip_as=READ if sparse_size == 0 else SKIP,
                              zero_below=_backing_size(st, dest))
        size = _feed(job, src, marks, sink, threads, progress)
        if geo.l1_size_for(size) > hdr.MAX_L1_BYTES // L1E_SIZE:
            raise InvalidArgumentError(f"input of {size} bytes is too large for "
                                       f"cluster_size {cs}")
        writer.finish(size, sync=sync)
        out.commit(sync)
        ok = True
    finally:
        if writer is not None:
            writer.close()
        if dfile is not None:
            dfile.close()
        out.close(ok)
    if progress is not None and src is not None and size == 0:
        progress(0, 0)


def _convert_through_image(src, dest, format, options, sparse_size, existing,
                           target_is_zero, threads, progress, sync, direct, compress,
                           out_secret=None, top_only=False, target_open=None, pace=None):
    """Raw output, -n, extended L2 and preallocated qcow2: writes through
    Image.write (qcow2) or pwrite (raw).  ``compress``: None, or a 1-tuple
    with the compression level (the compression type is the target's):
    the pool compresses, as for a new image, and the payloads go to
    Image.write_compressed_clusters."""
    size = whole_sectors(src.size) if src is not None else None
    if existing and not is_remote_target(dest):
        if not os.path.exists(dest):
            raise hostfile.not_found(dest)
    out = Output(dest, in_place=existing, image=format == "qcow2")
    ok = False
    img = dfile = prefault = None
    try:
        if format == "qcow2" and not existing:
            create(out.path, size, **options)
        if format == "qcow2":
            from ..engine.image import Image
            img = Image(out.path, "r+", cache_mode="none" if direct else "unsafe",
                        cache_clean_interval=0, key_secret=out_secret, **(target_open or {}))
            tsize = img.size
            unit = img.cluster_size
        else:
            tsize = out.size()
            if not existing and size is not None:
                out.set_size(size)
            unit = sparse_size or (1 << 20)
            dfile = _open_direct(out.path) if direct else None
            if not (existing or direct or out.device or out.fd is None):   # a new file, sized
                prefault = hostfile.prefault_for(out.fd)

        def raw_write(data, off):
            if dfile is not None:
                dfile.pwrite(data, off)
                return
            t0 = time.thread_time()
            out.pwrite(data, off)
            if prefault is not None:
                prefault.wrote(len(data), time.thread_time() - t0)

        if existing and src is not None and tsize < src.size:
            raise InvalidArgumentError(f"target {dest!r} is smaller ({tsize} bytes) than "
                                       f"the source ({src.size} bytes)")
        # A new file reads as zeros where nothing is written; a device or an
        # existing target (-n) only with --target-is-zero.
        zero_target = target_is_zero or not (existing or out.device)
        compressor = None
        if compress is not None:
            compressor = _compressor(img.header.compression_type, compress[0])
        job = Job(unit, detect_zeros=sparse_size > 0, keep_zero=not zero_target,
                  compress=compressor, v2_zero_as_data=False, pace=pace)

        def spans(mask, nvalid):
            """Byte ranges [lo, hi) of the batch's runs of ``mask``, up to the source's end."""
            return [(a * unit, min(b * unit, nvalid)) for a, b in runs(mask)]

        def write_data(base, a, b, buf, nvalid):
            """Units [a, b) of the batch at ``base``, uncompressed, up to the source's end."""
            lo, hi = a * unit, min(b * unit, nvalid)
            if img is not None:
                img.write(base + lo, buf[lo:hi])
            else:
                raw_write(buf[lo:hi], base + lo)

        def write_batch(first, kinds, payloads, buf, nvalid):
            base = first * unit
            if payloads is not None:
                write_compressed(base, kinds, payloads, buf, nvalid)
            else:
                for a, b in runs(kinds == DATA):
                    write_data(base, a, b, buf, nvalid)
            if not zero_target:     # (UNALLOCATED: -n -B, what the backing file holds)
                for lo, hi in spans(kinds == ZERO, nvalid):
                    if img is not None:
                        img.write_zeroes(base + lo, hi - lo, may_unmap=True)
                    else:
                        out.zero(base + lo, hi - lo, raw_write)

        def write_compressed(base, kinds, payloads, buf, nvalid):
            """Runs of units of one kind, in disk order: uncompressed ones
            from ``buf`` (in place over what the target holds), compressed
            ones from ``payloads`` (one per data unit, in order)."""
            comp = dict(zip(np.flatnonzero((kinds == DATA) | (kinds == COMPRESSED)).tolist(),
                            payloads))
            edges = (np.flatnonzero(kinds[1:] != kinds[:-1]) + 1).tolist()
            for a, b in zip([0] + edges, edges + [len(kinds)]):
                if kinds[a] == DATA:
                    write_data(base, a, b, buf, nvalid)
                if kinds[a] != COMPRESSED:
                    continue
                end = base + min(b * unit, nvalid)
                if not zero_target and end % unit and end < tsize:
                    # The source ends inside this cluster and the target goes
                    # on (and may hold data): only the source's bytes are written.
                    write_data(base, b - 1, b, buf, nvalid)
                    b -= 1
                if a == b:
                    continue
                if not zero_target:
                    # Compressed clusters only go where nothing is allocated.
                    img.discard(base + a * unit, min(b * unit, tsize - base) - a * unit)
                try:
                    img.write_compressed_clusters(base + a * unit,
                                                  [comp[i] for i in range(a, b)])
                except UnsupportedFeatureError:     # (a data file: qemu's ENOTSUP)
                    raise ConvertError(f"error while writing at byte {base + a * unit}: "
                                       "Operation not supported") from None

        def sink(first, kinds, payloads, buf, nvalid):
            if img is not None and img.state.transform is not None and payloads is None:
                # Encrypted: the writer thread allocates, encrypts (the GIL
                # released) and writes, in order, beside the readers.
                return lambda: write_batch(first, kinds, None, buf, nvalid)
            if img is not None:     # in order: the image allocates clusters as it goes
                write_batch(first, kinds, payloads, buf, nvalid)
                return None
            if prefault is not None:
                for lo, hi in spans(kinds == DATA, nvalid):
                    prefault.ahead(first * unit + lo, hi - lo)
            return lambda: write_batch(first, kinds, None, buf, nvalid)   # raw: on the writer

        marks = None
        if src is not None:
            # (-n -B: what the source's backing file holds is not copied)
            skip_as = SKIP if top_only or (zero_target and sparse_size) else \
                READ if sparse_size == 0 else MUST_ZERO
            marks = UnitMarks(src, unit, top_only=top_only, skip_as=skip_as)
        size = _feed(job, src, marks, sink, threads, progress)
        if format == "raw" and not existing:
            out.set_size(size)
        if img is not None:
            img.close()
            img = None
        out.commit(sync)
        ok = True
    finally:
        if prefault is not None:
            prefault.close()
        if img is not None:
            img.close()
        if dfile is not None:
            dfile.close()
        out.close(ok)
