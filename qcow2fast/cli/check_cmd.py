"""qcow2fast check [-f fmt] [--output=human|json] [-r leaks|all] [-q] [-U] [--image-opts] filename

qemu-img 7.2's check: the same messages (on stderr), JSON keys and exit
statuses -- 0 clean, 1 check not completed, 2 corruptions, 3 leaks only,
63 format cannot be checked.  Without -r the image is opened read-only and
never written."""

import json
import sys

from ..engine.snapshot import SnapshotTableError
from ..errors import Qcow2Error
from ..engine.untrusted import check_path
from ..host import blkdebug
from ..host.lock import Holder
from ..host.remote import is_url, is_writable, protocol_of
from .objects import secrets
from .common import add_image_arguments, open_error, open_null, resolve_image, warn_stale_bitmaps
from .options import check_lines, prog, source_cache


def add_parser(sub):
    p = sub.add_parser("check", help="check an image for consistency (and repair it)")
    p.expects("Expecting one image file name")
    add_image_arguments(p, output=True)
    p.add_argument("-r", "--repair", dest="repair", choices=("leaks", "all"))
    p.add_argument("-T", dest="src_cache")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("--explain", action="store_true",
                   help="under each leak and corruption, say what references the cluster")
    p.add_argument("filename")
    p.set_defaults(run=run)


def run(args):
    source_cache(args.src_cache or "writeback")
    if not args.image_opts and blkdebug.is_blkdebug_name(args.filename):
        # (check reads the file itself, not through the filter's rules)
        print(f"{prog()}: Could not open '{args.filename}': check does not run through the "
              "blkdebug filter: check the image itself", file=sys.stderr)
        return 1
    null = open_null(args.filename, args.fmt, args.image_opts, False)
    if null is not None:
        null.close()
        path, fmt = null.path, "raw"                # (no format of its own to check)
    else:
        path, fmt, opts = resolve_image(args.filename, args.fmt, args.image_opts,
                                        secrets(args.objects))
    if fmt == "raw":
        print(f"{prog()}: This image format does not support checks", file=sys.stderr)
        return 63
    if args.repair and is_url(path) and not is_writable(path):
        # (an ssh:// file or an NBD export is repaired in place, as qemu does)
        curl = protocol_of(path) in ("http", "https", "ftp", "ftps")
        why = "curl driver does not support writes" if curl else \
            "check -r repairs only local files, ssh:// files and NBD exports"
        print(f"{prog()}: Could not open '{args.filename}': {why}", file=sys.stderr)
        return 1
    try:
        from ..engine.crypto import unlock_for_check
        keep = ("key_secret", "data_file", "remote")       # (Image's options from --image-opts)
        unlock_for_check(path, untrusted=args.untrusted, **{k: opts[k] for k in keep if k in opts})
    except (Qcow2Error, OSError) as e:      # (OSError: a backing or data file missing)
        print(f"{prog()}: {open_error(args.filename, e)}", file=sys.stderr)
        return 1
    try:
        # Held for the whole command, which opens the file several times.
        holder = Holder(path, fmt, bool(args.repair), opts.get("force_share", args.force_share)) \
            if opts.get("locking", True) and not is_url(path) else None
    except Qcow2Error as e:
        print(f"{prog()}: {e}", file=sys.stderr)
        return 1
    try:
        return _check(args, path)
    finally:
        if holder is not None:
            holder.close()


def _check(args, path):
    from ..fsck.check import check_image     # imported for this command only
    from ..fsck.repair import repair_image
    try:
        if args.untrusted:              # check opens no backing file: the names only
            check_path(path)
        warn_stale_bitmaps(stale_bitmaps(path))
        first = check_image(path, args.repair, args.explain)
    except SnapshotTableError as e:      # qemu's check gives up on the table, -r all mends it
        print(f"{prog()}: " + "\n".join(e.check_lines), file=sys.stderr)
        print(f"{prog()}: Check failed: File too large", file=sys.stderr)
        return 1
    except Qcow2Error as e:
        print(f"{prog()}: {open_error(args.filename, e)}", file=sys.stderr)
        if args.explain and getattr(e, "qemu", None):   # qemu's words, then the field
            print(f"{prog()}: {e}", file=sys.stderr)
        return 1
    if args.repair:
        clear_unknown_autoclear(path)
    _messages(first)
    if first.failed:
        print(f"{prog()}: Check failed: {first.failed}", file=sys.stderr)
        return 1
    result = first
    if args.repair and (first.leaks or first.corruptions or first.corruptions_fixed
                        or first.flags):
        try:
            repair_image(path, first, args.repair)
        except Qcow2Error as e:
            print(f"{prog()}: {e}", file=sys.stderr)
            return 1
        leaks_fixed, corruptions_fixed = first.leaks_fixed, first.corruptions_fixed
        if leaks_fixed or corruptions_fixed:
            if args.output == "human" and not args.quiet:
                print("The following inconsistencies were found and repaired:\n\n"
                      f"    {leaks_fixed} leaked clusters\n"
                      f"    {corruptions_fixed} corruptions\n\n"
                      "Double checking the fixed image now...")
            result = check_image(path, explain=args.explain)
            _messages(result)
            result.leaks_fixed, result.corruptions_fixed = leaks_fixed, corruptions_fixed
    if args.quiet:
        pass                            # -q silences the report, JSON included (as qemu)
    elif args.output == "json":
        print(json.dumps(check_json(result, args.filename), indent=4))
    else:
        print(human(result), end="")
    if result.check_errors:
        print(f"{prog()}: Check failed", file=sys.stderr)
        return 1
    if result.corruptions:
        return 2
    if result.leaks:
        return 3
    return 0


def clear_unknown_autoclear(path):
    """check -r opens the image for writing, which clears the auto-clear
    bits qemu does not know (qcow2.txt: a program that does not know one
    clears it when it changes the image)."""
    from ..host.file import open_in_place
    from ..spec import header as hdr
    known = hdr.AUTOCLEAR_BITMAPS | hdr.AUTOCLEAR_DATA_FILE_RAW
    f = open_in_place(path)
    try:
        h = hdr.parse_header(f.pread(0, min(f.size(), 2 << 20)), f.size(), check=True)
        if h.version >= 3 and h.autoclear_features & ~known:
            f.pwrite((h.autoclear_features & known).to_bytes(8, "big"),
                     hdr.FIELD_OFFSET["autoclear_features"])
            f.sync()
    except Qcow2Error:
        pass                    # the check said what is wrong with the header
    finally:
        f.close()


def stale_bitmaps(path):
    """qemu's warning if the image's bitmaps were disowned, or None."""
    from ..engine.bitmap_list import stale_warning
    from ..host.file import open_image_file
    from ..spec import header as hdr
    f = open_image_file(path, "qcow2", locking=False)     # the holder has locked it
    try:
        size = f.size()
        try:
            h = hdr.parse_header(f.pread(0, min(size, 2 << 20)), size, check=True)
        except Qcow2Error:
            return None         # check_image reports it, as qemu's check does
        return stale_warning(h)
    finally:
        f.close()


def _messages(res):
    check_lines(res.messages)
    if res.messages_dropped:
        print(f"({res.messages_dropped} more lines like these not shown)", file=sys.stderr)


# qemu's ImageCheck members in its order: (key, attribute, always present).
JSON_MEMBERS = [
    ("image-end-offset", "image_end_offset", False), ("total-clusters", "total_clusters", False),
    ("corruptions", "corruptions", False), ("corruptions-fixed", "corruptions_fixed", False),
    ("check-errors", "check_errors", True), ("leaks", "leaks", False),
    ("leaks-fixed", "leaks_fixed", False), ("allocated-clusters", "allocated_clusters", False),
    ("filename", None, True), ("format", None, True),
    ("compressed-clusters", "compressed_clusters", False),
    ("fragmented-clusters", "fragmented_clusters", False),
]


def check_json(res, filename):
    """qemu's ImageCheck: optional members only when non-zero."""
    fixed = {"filename": filename, "format": "qcow2"}
    out = {}
    for key, attr, always in JSON_MEMBERS:
        value = fixed[key] if attr is None else getattr(res, attr)
        if always or value:
            out[key] = value
    return out


def human(res):
    lines = []
    if not (res.corruptions or res.leaks or res.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if res.corruptions:
            lines += ["", f"{res.corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if res.leaks:
            lines += ["", f"{res.leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if res.check_errors:
            lines += ["", f"{res.check_errors} internal errors have occurred during the check."]
    if res.total_clusters and res.allocated_clusters:
        a, t = res.allocated_clusters, res.total_clusters
        lines.append(f"{a}/{t} = {a * 100.0 / t:0.2f}% allocated, "
                     f"{res.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
                     f"{res.compressed_clusters * 100.0 / a:0.2f}% compressed clusters")
    if res.image_end_offset:
        lines.append(f"Image end offset: {res.image_end_offset}")
    return "\n".join(lines) + "\n"
