"""qcow2fast measure [--output=human|json] [-O fmt] [-o options]
                  [--size N | [-l snapshot] [-f fmt] filename]"""

import json

from .common import add_share_arguments, open_image, share_options
from .create_cmd import qcow2_options
from .options import UsageError, merge_options, parse_size


def add_parser(sub):
    p = sub.add_parser("measure", help="how large a new image needs to be")
    p.add_argument("--output", dest="output", default="human", choices=("human", "json"))
    p.add_argument("-O", dest="out_fmt", default="raw")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("--size", dest="size")
    p.add_argument("-f", dest="fmt")
    add_share_arguments(p)
    p.add_argument("--image-opts", dest="image_opts", action="store_true")
    p.add_argument("-l", dest="snapshot")
    p.add_argument("filename", nargs="?")
    p.set_defaults(run=run)


def run(args):
    from ..ops.measure import measure
    if args.size is not None and args.filename:
        raise UsageError("measure: --size N cannot be used together with a filename")
    if args.size is None and not args.filename:
        raise UsageError("measure: either --size N or one filename must be specified")
    if args.out_fmt not in ("qcow2", "raw"):
        raise UsageError(f"measure: unknown or unsupported output format {args.out_fmt!r}")
    opts = merge_options(args.options)
    kw = {}
    if args.out_fmt == "qcow2":
        kw = qcow2_options(opts, "measure")
        # (qemu sizes the image file alone: the data file changes nothing)
        for key in ("lazy_refcounts", "compression_type", "backing_format", "data_file",
                    "data_file_raw"):
            kw.pop(key, None)
    elif opts:
        raise UsageError(f"measure: invalid parameter {next(iter(opts))!r} for format raw")
    size = source = None
    try:
        if args.filename:
            source = open_image(args.filename, args.fmt, image_opts=args.image_opts,
                                snapshot=args.snapshot, **share_options(args))
        else:
            size = parse_size(args.size, "size")
        result = measure(source, size=size, fmt=args.out_fmt, **kw)
    finally:
        if source is not None:
            source.close()
    if args.output == "json":
        print(json.dumps(result, indent=4))
    else:
        print(f"required size: {result['required']}")
        print(f"fully allocated size: {result['fully-allocated']}")
        if "bitmaps" in result:
            print(f"bitmaps size: {result['bitmaps']}")
    return 0
