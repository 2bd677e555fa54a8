"""qcow2fast resize [-f fmt] [--image-opts] [--shrink] [--preallocation=mode] [-q] filename [+|-]size

qemu-img 7.2's resize: the size is always the last argument (so ``-1G``
is a size, not an option), ``+``/``-`` make it relative, shrinking needs
``--shrink``, and success prints ``Image resized.``.  Raw images are
truncated (or extended, with falloc/full preallocation)."""

import sys

from ..errors import InvalidArgumentError
from .objects import secrets
from .common import add_untrusted_argument, open_image
from . import options
from .options import UsageError, error_exit, prog

NAME = "resize"
SHRINK_WARNING = ("warning: Shrinking an image will delete all data beyond the shrunken "
                  "image's end. Before performing such an operation, make sure there is no "
                  "important data there.")


def add_parser(sub):
    p = sub.add_parser(NAME, help="change the virtual size of an image")
    p.expects("Expecting image file name and size")
    p.add_argument("-f", dest="fmt")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("--image-opts", dest="image_opts", action="store_true")
    p.add_argument("--object", dest="objects", action="append", default=[])
    add_untrusted_argument(p)
    p.add_argument("--shrink", action="store_true")
    p.add_argument("--preallocation", default="off")
    p.add_argument("filename")
    p.add_argument("size")
    p.set_defaults(run=run)


def size_last(argv):
    """qemu-img takes the size from the end before parsing options (a
    negative size is not an option): put it after ``--``."""
    if len(argv) < 3:
        raise error_exit("Not enough arguments")
    return argv[:-1] + ["--", argv[-1]]


def run(args):
    from ..engine.resize import PREALLOCATION_MODES
    if args.preallocation not in PREALLOCATION_MODES:
        raise UsageError(f"Invalid preallocation mode '{args.preallocation}'")
    text = args.size
    sign = {"+": 1, "-": -1}.get(text[:1], 0)
    n = options.opt_size(text[1:] if sign else text, "size")
    img = open_image(args.filename, args.fmt, image_opts=args.image_opts, writable=True,
                     secrets=secrets(args.objects), untrusted=args.untrusted)
    try:
        current = img.size
        total = current + sign * n if sign else n
        if total <= 0:
            raise InvalidArgumentError("New image size must be positive")
        if total <= current and args.preallocation != "off":
            raise InvalidArgumentError("Preallocation can only be used for growing images")
        if total < current and not args.shrink:
            print(f"{prog()}: Use the --shrink option to perform a shrink operation.\n"
                  f"{prog()}: {SHRINK_WARNING}", file=sys.stderr)
            return 1
        if hasattr(img, "resize"):
            img.resize(total, shrink=True, preallocation=args.preallocation)
        else:
            _resize_raw(img, total, args.preallocation)
    finally:
        img.close()
    if not args.quiet:
        print("Image resized.")
    return 0


def _resize_raw(raw, size, preallocation):
    """A raw file: truncated, or grown (sparse, or allocated: falloc, full)."""
    if preallocation == "metadata":
        raise InvalidArgumentError("Unsupported preallocation mode: metadata")
    f, old = raw.file, raw.size
    if f.is_device:
        raise InvalidArgumentError("Cannot resize a block device")
    f.truncate(size)
    if size > old and preallocation == "falloc":
        f.fallocate(old, size - old)
    elif size > old and preallocation == "full":
        zeros = bytes(min(size - old, 1 << 20))
        for off in range(old, size, len(zeros)):
            f.pwrite(zeros[:min(len(zeros), size - off)], off)
    f.sync_all()
