"""qcow2fast amend [-f fmt] [--image-opts] [-p] [-q] [-t cache] [--force] -o options filename

qemu-img 7.2's amend for qcow2: ``-o help`` lists the options, errors are
qemu's (with its second line where it has one), and nothing is written
when an option cannot be amended."""

import sys

from .common import add_untrusted_argument, check_untrusted, resolve_image
from .objects import lookup_secret, secrets
from .options import UsageError, error_exit, merge_options, prog
from .progress import PercentProgress

NAME = "amend"


def add_parser(sub):
    p = sub.add_parser(NAME, help="change the options of an existing image")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-t", dest="cache")
    p.add_argument("--force", action="store_true")
    p.add_argument("--image-opts", dest="image_opts", action="store_true")
    p.add_argument("--object", dest="objects", action="append", default=[])
    add_untrusted_argument(p)
    p.add_argument("filenames", nargs="*")
    p.set_defaults(run=run)


def options_help():
    from ..ops.amend import AMEND_OPTIONS
    lines = ["Amend options for 'qcow2':"]
    for name, kind, text in AMEND_OPTIONS:
        lines.append(f"  {name + '=<' + kind + '>':<22} - {text}")
    return "\n".join(lines) + "\n"


def run(args):
    if not args.options:
        raise error_exit("Must specify options (-o)")
    opts = merge_options(args.options)
    args.filename = args.filenames[0] if len(args.filenames) == 1 else None
    if args.filename is None and not ("help" in opts and args.fmt):
        raise UsageError("Expecting one image file name")
    fmt = args.fmt
    table = secrets(args.objects)
    key_secret = data_file = None
    if args.filename is not None and not ("help" in opts and fmt):
        path, fmt, kw = resolve_image(args.filename, fmt, args.image_opts, table)
        key_secret, data_file = kw.get("key_secret"), kw.get("data_file")
    if fmt != "qcow2":
        raise UsageError(f"Format driver '{fmt}' does not support option amendment")
    if "help" in opts or "?" in opts:
        print(options_help(), end="")
        return 0
    if args.untrusted:          # (amend opens the image itself)
        check_untrusted(args.filename, fmt, args.image_opts, table)
    for key in ("encrypt.new-secret", "encrypt.old-secret"):
        if opts.get(key) is not None:       # the id, looked up where qemu does
            opts[key] = lambda oid=opts[key]: lookup_secret(table, oid)
    if "size" in opts and opts["size"] is not None:
        from .options import opt_size
        opts["size"] = opt_size(opts["size"], "size")
    from ..errors import BadPassphraseError, MissingSecretError
    from ..ops.amend import AmendOptionError, amend
    # qemu-img amend -p's own lines: "    (NN.NN/100%)\r" on stdout, from 0 to 100
    bar = PercentProgress(args.progress and not args.quiet, 1.0, repeat_ends=True)
    bar(0, 1)
    failed = None
    try:
        amend(path, opts, progress=bar, key_secret=key_secret, force=args.force,
              data_file=data_file)
    except AmendOptionError as e:
        failed = f"{prog()}: {e}" + (f"\n{e.hint}" if e.hint else "")
    except (MissingSecretError, BadPassphraseError) as e:
        failed = f"{prog()}: Could not open '{args.filename}': {e}"
    bar(1, 1)           # (qemu: 100% even when it failed, then the error, then the newline)
    if failed is not None:
        print(failed, file=sys.stderr)
    bar.close()
    if failed is not None:
        return 1
    return 0
