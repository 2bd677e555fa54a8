"""qcow2fast compare [-f fmt] [-F fmt] [-s] [-q] [-U] [--image-opts] filename1 filename2

qemu-img's exit statuses: 0 identical, 1 different, 2 an image cannot be
opened, 3 block status cannot be read, 4 data cannot be read."""

import os
import sys

from ..errors import Qcow2Error
from ..spec.constants import SECTOR
from .common import add_share_arguments, open_error, open_image, share_options
from .progress import Progress
from .options import UsageError, prog, source_cache

CHUNK = 1 << 20


def add_parser(sub):
    p = sub.add_parser("compare", help="compare the contents of two images")
    p.expects("Expecting two image file names")
    p.add_argument("-f", dest="fmt1")
    p.add_argument("-F", dest="fmt2")
    p.add_argument("-s", dest="strict", action="store_true")
    p.add_argument("-T", dest="src_cache")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    add_share_arguments(p)
    p.add_argument("--image-opts", dest="image_opts", action="store_true")
    p.add_argument("filename1")
    p.add_argument("filename2")
    p.set_defaults(run=run)


def run(args):
    try:
        source_cache(args.src_cache or "writeback")
    except UsageError as e:             # (compare's status for it: 2, as qemu-img's)
        print(f"{prog()}: {e}", file=sys.stderr)
        return 2
    say = (lambda msg: None) if args.quiet else print
    images = []
    try:
        for name, fmt in ((args.filename1, args.fmt1), (args.filename2, args.fmt2)):
            try:
                images.append(open_image(name, fmt, image_opts=args.image_opts,
                                          **share_options(args)))
            except (Qcow2Error, OSError) as e:     # (open_image says "Could not open")
                print(f"{prog()}: {open_error(name, e)}", file=sys.stderr)
                return 2
        with Progress(args.progress, max(images[0].size, images[1].size), "compare") as bar:
            return compare(images[0], images[1], args.strict, say, bar,
                           names=(args.filename1, args.filename2))
    finally:
        for img in images:
            img.close()


def _status(img, offset, end):
    """qemu's block status at ``offset``: (flags, extent end)."""
    e = img.block_status(offset, end - offset)[0]
    stop = e.offset + e.length
    return (e.kind in ("data", "compressed"), e.kind != "unallocated",
            e.kind in ("zero", "unallocated"), stop == img.size), stop


def compare(a, b, strict, say, progress=None, names=None):
    """qemu-img compare of two open images; ``names``: theirs, for errors."""
    a, b = (_Named(img, name) for img, name in zip((a, b), names or (a.path, b.path)))
    if a.size != b.size and strict:
        say("Strict mode: Image size mismatch!")
        return 1
    common = min(a.size, b.size)
    pos = 0
    while pos < common:
        try:
            sa, ea = _status(a, pos, common if not strict else a.size)
            sb, eb = _status(b, pos, common if not strict else b.size)
        except Qcow2Error as e:
            print(f"{prog()}: error getting block status at offset {pos}: {e}", file=sys.stderr)
            return 3
        if strict and sa != sb:
            say(f"Strict mode: Offset {pos} block status mismatch!")
            return 1
        end = min(ea, eb, common)
        if not (sa[2] and sb[2]):           # unless both read as zeros: compare the data
            bad = _first_difference(a, b, pos, end)
            if bad is None:
                return 4
            if bad >= 0:
                say(f"Content mismatch at offset {bad}!")
                return 1
        pos = end
        if progress is not None:
            progress.advance_to(pos)
    if a.size != b.size:            # said once the common part is equal, as qemu
        say("Warning: Image size mismatch!")
    longer = a if a.size > b.size else b
    bad = _first_nonzero(longer, common, longer.size)
    if bad is None:
        return 4
    if bad >= 0:
        say(f"Content mismatch at offset {bad}!")
        return 1
    say("Images are identical.")
    return 0


def _first_difference(a, b, start, end):
    """Offset of the first differing 512-byte sector in [start, end), -1 if
    none, None on a read error (reported)."""
    pos = start
    while pos < end:
        n = min(CHUNK, end - pos)
        try:
            x, y = a.read(pos, n), b.read(pos, n)
        except _ReadFailed:
            return None
        if x != y:
            i = next(i for i in range(0, n, SECTOR) if x[i:i + SECTOR] != y[i:i + SECTOR])
            return pos + i
        pos += n
    return -1


def _first_nonzero(img, start, end):
    """First 512-byte sector in [start, end) that is not all zeros, -1 if
    none, None on a read error."""
    pos = start
    while pos < end:
        e = img.block_status(pos, end - pos)[0]
        stop = e.offset + e.length
        if e.kind not in ("zero", "unallocated"):
            zeros = _first_difference(img, _Zeros(img.size), pos, stop)
            if zeros != -1:
                return zeros
        pos = stop
    return -1


class _ReadFailed(Exception):
    """A read failed; qemu's error was printed."""


class _Named:
    """An image whose read errors are printed as qemu-img compare prints
    them, naming the image as it was given."""

    def __init__(self, img, name):
        self.img, self.name, self.size = img, name, img.size

    def block_status(self, offset, length):
        return self.img.block_status(offset, length)

    def read(self, offset, n):
        try:
            return self.img.read(offset, n)
        except (Qcow2Error, OSError) as e:
            why = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e)
            print(f"{prog()}: Error while reading offset {offset} of {self.name}: {why}",
                  file=sys.stderr)
            raise _ReadFailed from None


class _Zeros:
    """An image of zeros, to compare the tail of the longer image with."""

    def __init__(self, size):
        self.size = size

    def read(self, offset, n):
        return bytes(n)
