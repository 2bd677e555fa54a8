"""qcow2fast commit [-f fmt] [-t cache] [-b base] [-d] [-p] [-q] filename

qemu-img commit: the image's data written into its backing file (or into
``-b base`` from every layer above it), then the image emptied unless
``-d``; ``-b`` implies ``-d``, as in qemu-img.  Prints "Image committed."
(not with -q); ``-p`` prints qemu-img's percentages on stdout."""

import os

from ..errors import InvalidArgumentError
from .common import add_untrusted_argument, check_untrusted, named_as, resolve_image
from .objects import secrets
from .options import UsageError, cvtnum, error_exit
from .progress import PercentProgress


def add_parser(sub):
    p = sub.add_parser("commit", help="commit an image's data into its backing file")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-t", dest="cache", default="writeback")
    p.add_argument("-b", dest="base")
    p.add_argument("-d", dest="drop", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-r", dest="rate_limit")
    p.add_argument("--image-opts", dest="image_opts", action="store_true")
    p.add_argument("--object", dest="objects", action="append", default=[])
    add_untrusted_argument(p)
    p.add_argument("filenames", nargs="*")
    p.set_defaults(run=run)


def one_image(args, raw_error, backing=True):
    """The one image argument (commit, rebase): (its path, its
    encrypt.key-secret or None), qcow2 (a raw image has no backing file:
    ``raw_error``); ``backing``: its chain will be opened."""
    if len(args.filenames) != 1:
        raise error_exit("Expecting one image file name")
    path, fmt, kw = resolve_image(args.filenames[0], args.fmt, args.image_opts,
                                  secrets(args.objects), backing=backing)
    if fmt == "raw":
        raise InvalidArgumentError(raw_error)
    if args.untrusted:          # (the operation opens the chain itself)
        check_untrusted(args.filenames[0], args.fmt, args.image_opts, secrets(args.objects))
    return path, kw.get("key_secret")


def run(args):
    from ..ops.commit import commit
    rate = None if args.rate_limit is None else cvtnum("rate limit", args.rate_limit)
    path, key_secret = one_image(args, "Image does not have a backing file")
    bar = PercentProgress(args.progress and not args.quiet, 1.0)
    bar(0, 1)
    try:
        with named_as({path: args.filenames[0]}):
            commit(path, base=args.base, drop=args.drop or args.base is not None,
                   cache=args.cache, progress=bar if bar.enabled else None,
                   key_secret=key_secret, rate_limit=rate)
        bar(1, 1)
    except OSError as e:            # qemu-img's words for a failed step (ops/commit.py)
        step = getattr(e, "qemu_step", None)
        if step is None or not e.errno:
            raise
        if step == "Failed to empty":
            step += " " + args.filenames[0]
        raise UsageError(f"{step}: {os.strerror(e.errno)}") from None
    finally:
        bar.close()
    if not args.quiet:
        print("Image committed.")
    return 0
