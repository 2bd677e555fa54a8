"""qcow2fast check [-f fmt] [--output=human|json] [-r leaks|all] [-q] [-U] [--image-opts] filename

qemu-img 7.2's check: the same messages (on stderr), JSON keys and exit
statuses -- 0 clean, 1 check not completed, 2 corruptions, 3 leaks only,
63 format cannot be checked.  Without -r the image is opened read-only and
never written."""

import json
import os
import sys

from ..backing import probe_format
from ..check import check_image, repair_image
from ..errors import Qcow2Error
from .common import FORMATS, add_image_arguments, image_spec
from .options import UsageError


def add_parser(sub):
    p = sub.add_parser("check", help="check an image for consistency (and repair it)")
    add_image_arguments(p, output=True)
    p.add_argument("-r", dest="repair", choices=("leaks", "all"))
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")
    p.set_defaults(run=run)


def run(args):
    path, fmt, _cache_opts = image_spec(args.filename, args.fmt, args.image_opts)
    if not os.path.exists(path):
        raise FileNotFoundError(2, "Could not open image: No such file or directory", path)
    fmt = fmt or probe_format(path)
    if fmt not in FORMATS:
        raise UsageError(f"unknown or unsupported format {fmt!r} (supported: qcow2, raw)")
    if fmt == "raw":
        print("qcow2fast: This image format does not support checks", file=sys.stderr)
        return 63
    try:
        first = check_image(path, args.repair)
    except Qcow2Error as e:
        print(f"qcow2fast: Could not open '{args.filename}': {e}", file=sys.stderr)
        return 1
    _messages(first)
    result = first
    if args.repair and (first.leaks or first.corruptions or first.corruptions_fixed
                        or first.flags):
        try:
            repair_image(path, first, args.repair)
        except Qcow2Error as e:
            print(f"qcow2fast: {e}", file=sys.stderr)
            return 1
        leaks_fixed, corruptions_fixed = first.leaks_fixed, first.corruptions_fixed
        if leaks_fixed or corruptions_fixed:
            if args.output == "human" and not args.quiet:
                print("The following inconsistencies were found and repaired:\n\n"
                      f"    {leaks_fixed} leaked clusters\n"
                      f"    {corruptions_fixed} corruptions\n\n"
                      "Double checking the fixed image now...")
            result = check_image(path)
            _messages(result)
            result.leaks_fixed, result.corruptions_fixed = leaks_fixed, corruptions_fixed
    if args.quiet:
        pass                            # -q silences the report, JSON included (as qemu)
    elif args.output == "json":
        print(json.dumps(check_json(result, args.filename), indent=4))
    else:
        print(human(result), end="")
    if result.check_errors:
        print("qcow2fast: Check failed", file=sys.stderr)
        return 1
    if result.corruptions:
        return 2
    if result.leaks:
        return 3
    return 0


def _messages(res):
    for line in res.messages:
        print(line, file=sys.stderr)


def check_json(res, filename):
    """qemu's ImageCheck: optional members only when non-zero."""
    out = {}
    if res.image_end_offset:
        out["image-end-offset"] = res.image_end_offset
    if res.total_clusters:
        out["total-clusters"] = res.total_clusters
    if res.corruptions:
        out["corruptions"] = res.corruptions
    if res.corruptions_fixed:
        out["corruptions-fixed"] = res.corruptions_fixed
    out["check-errors"] = res.check_errors
    if res.leaks:
        out["leaks"] = res.leaks
    if res.leaks_fixed:
        out["leaks-fixed"] = res.leaks_fixed
    if res.allocated_clusters:
        out["allocated-clusters"] = res.allocated_clusters
    out["filename"] = filename
    out["format"] = "qcow2"
    if res.compressed_clusters:
        out["compressed-clusters"] = res.compressed_clusters
    if res.fragmented_clusters:
        out["fragmented-clusters"] = res.fragmented_clusters
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
