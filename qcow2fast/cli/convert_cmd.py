"""qcow2fast convert [-f fmt] [-O qcow2|raw] [-o options] [-c] [-S sparse_size]
[-B backing [-F fmt]] [-n] [--target-is-zero] [-m threads] [-W] [-t cache] [-p] [-q]
[-l snapshot] [--salvage] SRC [SRC2 ...] DST

qemu-img convert's options and meanings.  ``-`` as the only SRC reads a raw
stream from stdin; ``-`` as DST writes a qcow2 image to stdout.  ``-m`` is
the number of worker threads (default: the number of CPUs); ``-W`` is
accepted for compatibility (batches are always written in order).  ``-l``
reads an internal snapshot of the (single, qcow2) source: an id or name, or
``snapshot.id=ID,snapshot.name=NAME``, as qemu-img.  ``--compression-level N``
(not in qemu-img) sets the zlib (1-9, default 3) or zstd (1-22, default 3)
level used by ``-c``.  ``--salvage``: a sector that cannot be read is written as
zeros, with qemu-img's warning for it."""

import os

from ..host import blkdebug
from ..host.remote import is_url
from .objects import secrets
from ..engine.backing import probe_format
from ..errors import SnapshotNotFoundError
from .common import (add_share_arguments, check_backing_given, encrypt_format_mismatch,
                     file_path, image_spec, named_as, share_options, snapshot_not_found,
                     snapshot_spec)
from .create_cmd import format_error, options_help, qcow2_options
from .options import UsageError, cvtnum, merge_options, source_cache, warn
from .progress import ConvertPercent

# -t: qemu-img convert's default is unsafe (no flush); any other mode syncs
# the output before it is renamed into place, and none/directsync write it
# with O_DIRECT.  -T (source cache) is accepted.
MAX_SPARSE = 32768 * 512     # -S: qemu-img's MAX_BUF_SECTORS
CACHE_MODES = ("unsafe", "writeback", "writethrough", "none", "directsync")


def add_parser(sub):
    p = sub.add_parser("convert", help="convert or copy an image")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-O", dest="out_fmt")           # (raw when not given)
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-c", dest="compress", action="store_true")
    p.add_argument("-S", dest="sparse_size")       # (4k when not given)
    # copy offloading: a hint qemu-img follows where the host can; accepted
    # (with qemu's conflicts), the data is copied as without it
    p.add_argument("-C", dest="copy_range", action="store_true")
    p.add_argument("-B", dest="backing")
    p.add_argument("-F", dest="backing_fmt")
    p.add_argument("-n", dest="existing", action="store_true")
    p.add_argument("--target-is-zero", dest="target_is_zero", action="store_true")
    p.add_argument("-m", dest="threads")
    p.add_argument("-t", dest="cache", default="unsafe")
    p.add_argument("-T", dest="src_cache")
    p.add_argument("-r", dest="rate_limit")
    p.add_argument("-W", dest="out_of_order", action="store_true")
    p.add_argument("-l", dest="snapshot")
    p.add_argument("--compression-level", dest="compression_level", type=int)
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    add_share_arguments(p)
    p.add_argument("--image-opts", dest="image_opts", action="store_true")
    p.add_argument("--target-image-opts", dest="target_image_opts", action="store_true")
    p.add_argument("--bitmaps", dest="bitmaps", action="store_true")
    p.add_argument("--skip-broken-bitmaps", dest="skip_broken_bitmaps", action="store_true")
    p.add_argument("--salvage", action="store_true")
    p.add_argument("filenames", nargs="*")
    p.set_defaults(run=run)


def run(args):
    if args.rate_limit is not None:     # (parsed where qemu parses it: with the options)
        args.rate_limit = cvtnum("rate limit", args.rate_limit)
    if args.copy_range and (args.sparse_size is not None or args.compress):
        raise UsageError("Cannot enable copy offloading when "
                         f"{'-S' if args.sparse_size is not None else '-c'} is used")
    if args.copy_range and args.salvage:
        raise UsageError("Cannot use copy offloading in salvaging mode")
    if args.target_image_opts and args.out_fmt:
        raise UsageError("--image-opts and --format are mutually exclusive")
    if args.target_image_opts and not args.existing:
        raise UsageError("--target-image-opts requires use of -n flag")
    args.out_fmt = args.out_fmt or "raw"
    if args.out_fmt not in ("qcow2", "raw"):
        raise format_error(args.out_fmt)
    opts = merge_options(args.options)
    if "help" in opts or "?" in opts:
        print(options_help(args.out_fmt, args.filenames[-1] if args.filenames else None), end="")
        return 0
    if len(args.filenames) < 2:
        raise UsageError("Must specify image file name")
    source_cache(args.src_cache or "writeback")
    *names, dest = args.filenames
    sources, source_kw = source_specs(names, args)
    try:
        return _convert(args, opts, names, dest, sources, source_kw)
    finally:
        for src in sources:
            if not isinstance(src, str):
                src.close()


def _convert(args, opts, names, dest, sources, source_kw):
    from ..ops.convert import convert
    if args.target_image_opts:
        dest, args.out_fmt, source_kw["target_key_secret"] = target_spec(dest, args)
    elif args.existing and dest.startswith("json:"):       # an existing target's node (its children)
        from .json_filename import existing_target
        dest, args.out_fmt, source_kw["target_open"] = existing_target(dest, args.out_fmt)
    else:
        dest = file_path(dest)          # (a file: name is the file after it)
    if args.out_fmt == "qcow2":
        kw = qcow2_options(opts, "convert", secret_table=secrets(args.objects))
        backing = args.backing or kw.pop("backing_file", None)
        backing_fmt = args.backing_fmt or kw.pop("backing_format", None)
    elif opts:
        raise UsageError(f"Invalid parameter '{next(iter(opts))}'")
    else:
        kw, backing, backing_fmt = {}, args.backing, args.backing_fmt
    if args.existing and opts:
        raise UsageError("-o has no effect when skipping image creation")
    if backing_fmt and not backing:
        raise UsageError("convert: -F needs -B")
    if backing and len(sources) > 1:
        raise UsageError("Having a backing file for the target makes no sense when "
                         "concatenating multiple input images")
    if backing and not backing_fmt and not args.existing:
        raise UsageError("Use of backing file requires explicit backing format")
    sparse = cvtnum("buffer size for sparse output", args.sparse_size or "4k")
    if sparse % 512 or sparse > MAX_SPARSE:
        raise UsageError("Invalid buffer size for sparse output specified. Valid sizes are "
                         f"multiples of 512 up to {MAX_SPARSE}. Select 0 to disable sparse "
                         "detection (fully allocates output).")
    if args.cache not in CACHE_MODES:
        raise UsageError(f"Invalid cache option: {args.cache}")
    threads = None
    if args.threads is not None:
        try:
            threads = int(args.threads)
        except ValueError:
            threads = 0
        if not 1 <= threads <= 256:
            raise UsageError(f"convert: invalid number of threads (-m) {args.threads!r}: "
                             "1 to 256")
    if backing and backing_fmt and not args.existing and not is_url(backing):
        from ..engine.backing import resolve_backing_path
        from ..engine.backing import qemu_name
        if not os.path.exists(resolve_backing_path(dest, backing)):
            # qemu-img creates the target, then fails to open it (this
            # creates nothing)
            raise UsageError(f"Could not open '{dest}': Could not open backing file: Could not "
                             f"open '{qemu_name(dest, backing)}': No such file or directory")
    copy_bitmaps = _bitmaps_plan(args, sources, dest, kw)
    shown = args.progress and not args.quiet        # qemu's percent lines on stdout
    bar = ConvertPercent(shown, _data_ranges(sources, args) if shown else [])

    try:
        with named_as(dict(zip(sources, names))):
            convert(sources, dest, source_format=args.fmt, format=args.out_fmt, options=kw,
                    compress=args.compress, sparse_size=sparse, backing_file=backing,
                    backing_format=backing_fmt, existing=args.existing,
                    target_is_zero=args.target_is_zero, threads=threads,
                    progress=bar if shown else None,
                    sync=args.cache != "unsafe", direct=args.cache in ("none", "directsync"),
                    snapshot=snapshot_spec(args.snapshot),
                    compression_level=args.compression_level, salvage=args.salvage,
                    warn=(lambda message: None) if args.quiet else warn, rate_limit=args.rate_limit,
                    **source_kw)
    except SnapshotNotFoundError as e:
        raise snapshot_not_found(e) from None
    finally:
        bar.close()
    if copy_bitmaps:
        copy_bitmaps()
    return 0


def _data_ranges(sources, args):
    """The (start, end) ranges of data of the sources, one after another in
    the guest space convert copies: what qemu-img convert -p counts."""
    from .common import open_image
    out, base = [], 0
    for name in sources:
        if name == "-":
            continue
        img = name if not isinstance(name, str) else open_image(name, args.fmt,
                                                               force_share=True)
        try:
            out += [(base + e.offset, base + e.offset + e.length)
                    for e in img.block_status(0, img.size) if e.kind in ("data", "compressed")]
            base += img.size
        finally:
            if img is not name:
                img.close()
    return out


def _bitmaps_plan(args, sources, dest, kw):
    """--bitmaps: checked before converting (qemu's order and messages); the
    copy, to run once the data is in place, or None."""
    if args.skip_broken_bitmaps and not args.bitmaps:
        raise UsageError("Use of --skip-broken-bitmaps requires --bitmaps")
    if not args.bitmaps:
        return None
    from ..ops.bitmaps import check_bitmap_copy, copy_bitmaps
    from .common import open_image
    if len(sources) > 1:
        raise UsageError("Copying bitmaps only possible with single source")
    if not isinstance(sources[0], str):
        raise UsageError(f"Could not open '{sources[0].path}': --bitmaps needs a qcow2 "
                         "image file")
    if dest == "-":
        raise UsageError("convert: --bitmaps cannot be used when writing to stdout")
    src = open_image(sources[0], args.fmt)
    try:
        check_bitmap_copy(src, args.out_fmt, kw.get("compat", "1.1") != "0.10",
                          args.skip_broken_bitmaps)
    finally:
        src.close()

    def copy():
        src = open_image(sources[0], args.fmt)
        try:
            with open_image(dest, args.out_fmt, writable=True) as out:
                copy_bitmaps(src, out, args.skip_broken_bitmaps, warn)
        finally:
            src.close()
    return copy


def target_spec(name, args):
    """--target-image-opts (with -n): the existing target's (path, format,
    passphrase); an encrypted target without its secret fails as qemu's."""
    from .common import crypt_method, resolve_image
    path, fmt, opts = resolve_image(name, None, True, secrets(args.objects))
    secret = opts.pop("key_secret", None)
    for key in ("locking", "force_share"):
        opts.pop(key, None)
    if opts:
        raise UsageError(f"convert: option {next(iter(opts))!r} is not supported for the "
                         "target")
    if fmt == "qcow2" and secret is None:
        from ..engine.crypto import NEED_SECRET
        if crypt_method(path, opts.get("remote")):
            raise UsageError(f"Could not open '{name}': {NEED_SECRET}")
    return path, fmt, secret


def source_specs(names, args):
    """(sources, convert()'s source keyword arguments): a source is a path
    or URL, or a device opened here (a ``json:`` name, a null device; the
    caller closes it).  --image-opts sources give their file name or URL,
    ``encrypt.key-secret`` (one secret for all) and the curl driver's
    options (one set for all)."""
    kw = share_options(args)
    table = kw.pop("secrets")
    sources = []
    try:
        for name in names:
            sources.append(_device(name, args, kw, table) or
                           (_image_opts_source(name, args, kw, table) if args.image_opts
                            else file_path(name)))
    except BaseException:
        for src in sources:
            if not isinstance(src, str):
                src.close()
        raise
    return sources, kw


def _device(name, args, kw, table):
    """A source convert reads as an open device: a ``json:`` or
    ``blkdebug:`` name, or a null device by name or --image-opts; None for
    a file or URL."""
    from .common import open_image, open_null
    from .json_filename import is_json
    if not args.image_opts and (is_json(name) or blkdebug.is_blkdebug_name(name)):
        return open_image(name, args.fmt, force_share=kw["force_share"], secrets=table)
    return open_null(name, args.fmt, args.image_opts, False)


def _image_opts_source(name, args, kw, table):
    """The path or URL of an --image-opts source (its options into ``kw``)."""
    path, fmt, opts = image_spec(name, args.fmt, True, table)
    if "key_secret" in opts:
        kw["key_secret"] = opts.pop("key_secret")
    opts.pop("locking", None)
    opts.pop("shown_format", None)
    if "encrypt_format" in opts and (is_url(path) or os.path.exists(path)):
        why = encrypt_format_mismatch(path, fmt or probe_format(path, opts.get("remote")),
                                      opts.pop("encrypt_format"), opts.get("remote"))
        if why:
            raise UsageError(f"Could not open '{name}': {why}")
    opts.pop("encrypt_format", None)    # (a missing file: convert's open says)
    opts.pop("backing_keys", None)
    if "backing_given" in opts and os.path.exists(path):
        check_backing_given(name, path, opts.pop("backing_given"))
    if "remote" in opts:
        kw["remote"] = opts.pop("remote")
    if opts.pop("force_share", False):
        kw["force_share"] = True
    if opts:
        raise UsageError(f"convert: option {next(iter(opts))!r} is not supported for "
                         "sources")
    args.fmt = fmt
    return path
