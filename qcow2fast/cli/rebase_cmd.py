"""qcow2fast rebase [-f fmt] [-t cache] [-T src_cache] [-p] [-u] [-q] -b backing [-F fmt] filename

qemu-img rebase: the image's backing file changed to ``-b`` (``-b ""``:
none).  Safe mode first writes into the image the clusters where the old
and the new backing chains differ; ``-u`` only rewrites the header.  As in
qemu-img 7.2, a backing file needs its format (-F), and -u without -b
removes the backing file."""

from .common import add_untrusted_argument, named_as
from .commit_cmd import one_image
from .options import error_exit
from .progress import PercentProgress


def add_parser(sub):
    p = sub.add_parser("rebase", help="change an image's backing file")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-t", dest="cache", default="writeback")
    p.add_argument("-T", dest="src_cache", default="writeback")
    p.add_argument("-b", dest="backing")
    p.add_argument("-F", dest="backing_fmt")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-u", dest="unsafe", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("--image-opts", dest="image_opts", action="store_true")
    p.add_argument("--object", dest="objects", action="append", default=[])
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true")
    add_untrusted_argument(p)
    p.add_argument("filenames", nargs="*")
    p.set_defaults(run=run)


def run(args):
    from ..ops.rebase import rebase
    if len(args.filenames) == 1 and args.backing is None and not args.unsafe:
        raise error_exit("Must specify backing file (-b) or use unsafe mode (-u)")
    path, key_secret = one_image(args, f"Could not change the backing file to '{args.backing}': "
                                 "Operation not supported", backing=not args.unsafe)
    bar = PercentProgress(args.progress and not args.quiet, 2.0)
    bar(0, 1)
    try:
        with named_as({path: args.filenames[0]}):
            rebase(path, args.backing, backing_fmt=args.backing_fmt, unsafe=args.unsafe,
                   cache=args.cache, backing_cache=args.src_cache,
                   progress=bar if bar.enabled and not args.unsafe else None,
                   key_secret=key_secret, force_share=args.force_share)
        bar(1, 1)
    finally:
        bar.close()
    return 0
