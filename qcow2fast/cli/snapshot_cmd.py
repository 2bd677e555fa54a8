"""qcow2fast snapshot [-l | -a snapshot | -c snapshot | -d snapshot] [-f fmt] [-U] [-q]
[--image-opts] filename

qemu-img 7.2's snapshot command: its messages and exit statuses.  As in
qemu-img, ``-c`` allows a name that exists already (the new snapshot gets
the next id), ``-a`` takes an id or a name, ``-d`` a name, and no action
at all opens the image and does nothing.  ``-f`` is an addition (qemu-img
7.2 has none: it probes)."""

import errno
import os
import sys
import warnings

from ..errors import InvalidArgumentError, LeakWarning, LimitExceededError
from ..spec.snapshot import MAX_SNAPSHOTS
from .objects import secrets
from .common import add_image_arguments, open_image
from .info_cmd import snapshot_info, snapshot_list
from .options import error_exit

NAME_MAX = 255          # qemu-img copies the name into a 256-byte buffer


def add_parser(sub):
    p = sub.add_parser("snapshot", help="list, create, apply or delete internal snapshots")
    add_image_arguments(p)
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-l", dest="snap_list", action="store_true")
    for flag, action in (("-a", "apply"), ("-c", "create"), ("-d", "delete")):
        p.add_argument(flag, dest=f"snap_{action}", metavar="NAME")
    p.add_argument("filenames", nargs="*")
    p.set_defaults(run=run)


def _action(args):
    chosen = [(a, getattr(args, f"snap_{a}")) for a in ("apply", "create", "delete")
              if getattr(args, f"snap_{a}") is not None]
    if args.snap_list:
        chosen.insert(0, ("list", None))
    if len(chosen) > 1:
        raise error_exit("Cannot mix '-l', '-a', '-c', '-d'")
    return chosen[0] if chosen else (None, None)


def run(args):
    action, name = _action(args)
    if len(args.filenames) != 1:
        raise error_exit("Expecting one image file name")
    filename = args.filenames[0]
    writable = action in ("apply", "create", "delete")
    if writable and args.force_share:
        raise InvalidArgumentError(f"Could not open '{filename}': force-share=on can only be "
                                   "used with read-only images")
    img = open_image(filename, args.fmt, image_opts=args.image_opts, writable=writable,
                     force_share=args.force_share,
                     secrets=secrets(args.objects), untrusted=args.untrusted)
    try:
        if writable and getattr(img, "corrupt", False):
            raise InvalidArgumentError(f"Could not open '{filename}': qcow2: Image is corrupt; "
                                       "cannot be opened read/write")
        if action == "list":
            snaps = getattr(img, "snapshots", [])
            if snaps:
                print("\n".join(snapshot_list([snapshot_info(s) for s in snaps])))
        elif action == "create":
            _create(img, name)
        elif action == "apply":
            _apply(img, name)
        elif action == "delete":
            _delete(img, name)
    finally:
        img.close()
    return 0


def _failed(what, name, err):
    return InvalidArgumentError(f"Could not {what} snapshot '{name}': {err}")


def _errno(code):
    return f"-{code} ({os.strerror(code)})"


def _create(img, name):
    if not hasattr(img, "create_snapshot"):
        raise _failed("create", name, _errno(errno.ENOTSUP))
    name = name.encode()[:NAME_MAX].decode(errors="ignore")
    if len(img.snapshots) >= MAX_SNAPSHOTS:
        raise _failed("create", name, _errno(errno.EFBIG))
    try:
        img.create_snapshot(name, unique_name=False, icount=0)    # qemu-img's zeroed icount
    except LimitExceededError:          # a refcount would overflow: qemu's -EINVAL
        raise _failed("create", name, _errno(errno.EINVAL)) from None


def _apply(img, name):
    if not hasattr(img, "apply_snapshot"):
        raise _failed("apply", name, "Failed to load snapshot: " + os.strerror(errno.ENOTSUP))
    if not any(name in (s.id, s.name) for s in img.snapshots):
        raise _failed("apply", name, "Failed to load snapshot: " + os.strerror(errno.ENOENT))
    try:
        img.apply_snapshot(name)
    except LimitExceededError:
        raise _failed("apply", name, "Failed to load snapshot: " +
                      os.strerror(errno.EINVAL)) from None


def _delete(img, name):
    # qemu-img finds the snapshot by name only (bdrv_snapshot_find), then
    # deletes the one with that id and name.
    match = [s for s in getattr(img, "snapshots", []) if s.name == name]
    if not match:
        raise _failed("delete", name, "snapshot not found")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LeakWarning)
        try:
            img.delete_snapshot({"id": match[0].id, "name": match[0].name})
        except OSError as e:        # a step failed (engine/snapshot_ops.py): qemu's words
            if getattr(e, "qemu_step", None) is None or not e.errno:
                raise
            raise _failed("delete", name, f"{e.qemu_step}: {os.strerror(e.errno)}") from None
        finally:
            for w in caught:        # qemu-img prints these bare, and goes on
                if isinstance(w.message, LeakWarning):
                    print(w.message.qemu_message, file=sys.stderr)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
