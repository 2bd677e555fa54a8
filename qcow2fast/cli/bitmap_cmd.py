"""qcow2fast bitmap (--add | --remove | --clear | --enable | --disable |
--merge SOURCE [-b source_file [-F fmt]])... [-g granularity] [-f fmt]
[--image-opts] filename bitmap

qemu-img 7.2's bitmap: the actions run in command-line order on the one
image opened for writing; the first that fails stops the rest (what the
earlier ones did is kept, as qemu keeps it) and exits 1 with qemu's
"Operation OP on bitmap NAME failed: ..." line."""

import argparse
import sys

from ..errors import InvalidArgumentError, Qcow2Error
from .objects import secrets
from .common import add_image_arguments, open_image
from .options import UsageError, cvtnum, prog


class _Action(argparse.Action):
    """Collects the actions, in order, with --merge's source."""

    def __call__(self, parser, ns, value, option_string=None):
        ns.actions = list(ns.actions or []) + [(self.dest, value)]


def add_parser(sub):
    p = sub.add_parser("bitmap", help="change the persistent dirty bitmaps of an image")
    add_image_arguments(p)
    for name in ("add", "remove", "clear", "enable", "disable"):
        p.add_argument(f"--{name}", dest=name, nargs=0, action=_Action)
    p.add_argument("--merge", dest="merge", action=_Action)
    p.add_argument("-g", "--granularity", dest="granularity")
    p.add_argument("-b", "--source-file", dest="source_file")
    p.add_argument("-F", "--source-format", dest="source_fmt")
    p.add_argument("names", nargs="*")
    p.set_defaults(run=run, actions=None)


def default_granularity(cluster_size):
    """qemu's bdrv_get_default_bitmap_granularity: the cluster size, kept
    between 4 KiB and 64 KiB."""
    return min(65536, max(4096, cluster_size))


def run(args):
    granularity = None if args.granularity is None else cvtnum("granularity", args.granularity)
    actions = args.actions or []
    if not actions:
        raise UsageError("Need at least one of --add, --remove, --clear, --enable, --disable, "
                         "or --merge")
    kinds = {kind for kind, _ in actions}
    if granularity is not None and "add" not in kinds:
        raise UsageError("granularity only supported with --add")
    if args.source_fmt and not args.source_file:
        raise UsageError("-F only supported with -b")
    if args.source_file and "merge" not in kinds:
        raise UsageError("Merge bitmap source file only supported with --merge")
    if len(args.names) != 2:
        raise UsageError("Expecting filename and bitmap name")
    filename, bitmap = args.names
    img = open_image(filename, args.fmt, image_opts=args.image_opts, writable=True,
                     secrets=secrets(args.objects), untrusted=args.untrusted)
    src = None
    try:
        for kind, value in actions:
            try:
                if kind == "merge" and args.source_file and src is None:
                    # Bitmaps belong to one layer: the source's backing chain
                    # stays closed (it may be the image being written).
                    src = open_image(args.source_file, args.source_fmt, backing=False,
                                     untrusted=args.untrusted)
                _apply(img, kind, value, bitmap, granularity, src)
            except Qcow2Error as e:
                print(f"{prog()}: Operation {kind} on bitmap {bitmap} failed: {e}",
                      file=sys.stderr)
                return 1
    finally:
        if src is not None:
            src.close()
        img.close()
    return 0


def _apply(img, kind, value, bitmap, granularity, src):
    if kind == "add":
        if granularity is None:
            granularity = default_granularity(img.cluster_size)
        img.add_bitmap(bitmap, granularity)
    elif kind == "remove":
        img.remove_bitmap(bitmap)
    elif kind == "clear":
        img.clear_bitmap(bitmap)
    elif kind == "enable":
        img.enable_bitmap(bitmap)
    elif kind == "disable":
        img.disable_bitmap(bitmap)
    else:
        if src is not None and not hasattr(src, "dirty_bitmaps"):       # raw: none
            raise InvalidArgumentError(f"Dirty bitmap '{value}' not found")
        img.merge_bitmap(value, bitmap, src)
