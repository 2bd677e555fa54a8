"""qcow2fast measure [--output=human|json] [-O fmt] [-o options]
                  [--size N | [-l snapshot] [-f fmt] filename]"""

import json

from .common import add_share_arguments, open_image, share_options
from .create_cmd import qcow2_options
from .options import OptionError, UsageError, cvtnum, merge_options, prog


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
    p.add_argument("filenames", nargs="*")
    p.set_defaults(run=run)


def run(args):
    from ..ops.measure import measure
    size = None if args.size is None else cvtnum("image size", args.size)
    if len(args.filenames) > 1:
        raise UsageError("At most one filename argument is allowed.")
    args.filename = args.filenames[0] if args.filenames else None
    if not args.filename and (args.image_opts or args.fmt or args.snapshot):
        raise UsageError("--image-opts, -f, and -l require a filename argument.")
    if size is not None and args.filename:
        raise UsageError("--size N cannot be used together with a filename.")
    if size is None and not args.filename:
        raise UsageError("Either --size N or one filename must be specified.")
    if args.out_fmt not in ("qcow2", "raw"):
        raise UsageError(f"measure: unknown or unsupported output format {args.out_fmt!r}")
    opts = merge_options(args.options)
    kw = {}
    if args.out_fmt == "qcow2":
        try:
            kw = qcow2_options(opts, "measure")
        except OptionError as e:
            raise UsageError(f"{e}\n{prog()}: Invalid options for file format 'qcow2'") from None
        # (qemu sizes the image file alone: the data file changes nothing)
        for key in ("lazy_refcounts", "compression_type", "backing_format", "data_file",
                    "data_file_raw"):
            kw.pop(key, None)
    elif opts:
        raise UsageError(f"Invalid parameter '{next(iter(opts))}'\n"
                         f"{prog()}: Invalid options for file format 'raw'")
    source = None
    try:
        if args.filename:
            source = open_image(args.filename, args.fmt, image_opts=args.image_opts,
                                snapshot=args.snapshot, **share_options(args))
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
