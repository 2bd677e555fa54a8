"""qcow2fast dd [-f fmt] [-O output_fmt] [bs=N] [count=N] [skip=N] if=input of=output

qemu-img's semantics, including its reading of count: the output holds
count*bs bytes minus the skipped skip*bs (when count fits in the input).
One deliberate difference: skipping past the end of the input is an error
with exit status 1 (qemu-img 7.2 prints the error but exits 0)."""

from ..host import file as hostfile
from .common import add_share_arguments, file_path, open_image, share_options
from .options import INT_MAX, UsageError, cvtnum

CHUNK = 1 << 20


def add_parser(sub):
    p = sub.add_parser("dd", help="copy an image, dd-style")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-O", dest="out_fmt", default="raw")
    add_share_arguments(p)
    p.add_argument("--image-opts", dest="image_opts", action="store_true")
    p.add_argument("operands", nargs="*")
    p.set_defaults(run=run)


def parse_operands(operands):
    ops = {}
    for text in operands:
        key, sep, value = text.partition("=")
        if not sep or key not in ("if", "of", "bs", "count", "skip"):
            raise UsageError(f"unrecognized operand {key}")
        ops[key] = value
    if "if" not in ops or "of" not in ops:
        raise UsageError("Must specify both input and output files")
    bs = cvtnum("bs", ops.get("bs", "512"), 1, INT_MAX)
    count = cvtnum("count", ops["count"]) if "count" in ops else None
    skip = cvtnum("skip", ops["skip"]) if "skip" in ops else 0
    return ops["if"], ops["of"], bs, count, skip


def run(args):
    from ..ops.create import create as create_qcow2
    src_name, dst_name, bs, count, skip = parse_operands(args.operands)
    if args.out_fmt not in ("raw", "qcow2"):
        raise UsageError(f"dd: unknown or unsupported output format {args.out_fmt!r}")
    src = open_image(src_name, args.fmt, image_opts=args.image_opts, **share_options(args))
    try:
        size = src.size
        if count is not None and count <= src.size // bs:
            size = count * bs
        if skip * bs > size:
            raise UsageError(f"dd: {src_name}: cannot skip to specified offset")
        size -= skip * bs
        dst_name = file_path(dst_name)      # (a file: name is the file after it)
        if args.out_fmt == "raw":
            hostfile.create_raw(dst_name, size)
        else:
            create_qcow2(dst_name, size)
        dst = open_image(dst_name, args.out_fmt, writable=True)
        try:
            base = skip * bs
            for pos in range(0, size, CHUNK):
                n = min(CHUNK, size - pos)
                dst.write(pos, src.read(base + pos, n))
            dst.flush()
        finally:
            dst.close()
    finally:
        src.close()
    return 0
