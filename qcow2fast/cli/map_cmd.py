"""qcow2fast map [-f fmt] [--output=human|json] [--start-offset=N] [--max-length=N] filename

The extents of the guest disk through the backing chain, with qemu-img 7.2's
keys and its way of merging neighbours."""

import json
import sys

from ..errors import InvalidArgumentError
from ..extent import Extent
from .common import add_image_arguments, open_image, share_options
from .info_cmd import full_backing_filename
from .json_filename import shown_name
from .options import cvtnum, prog


def add_parser(sub):
    p = sub.add_parser("map", help="show the mapping of the guest disk")
    p.expects("Expecting one image file name")
    add_image_arguments(p, output=True)
    p.add_argument("-s", "--start-offset", dest="start", default="0")
    p.add_argument("-l", "--max-length", dest="max_length")
    p.add_argument("filename")
    p.set_defaults(run=run)


def run(args):
    from ..engine.blockstatus import chain_files, split_host_holes
    start = cvtnum("start offset", args.start)
    length = None if args.max_length is None else cvtnum("max length", args.max_length)
    img = open_image(args.filename, args.fmt, image_opts=args.image_opts, **share_options(args))
    try:
        end = img.size if length is None else min(img.size, start + length)
        # (the File column names the node holding the data: with
        # --image-opts, the image's file as the options name it)
        names = layer_names(img, img.path if args.image_opts and getattr(img, "path", None)
                            else shown_name(args.filename, img))
        raw = img.header is None
        extents = img.block_status(start, end - start) if end > start else []
        # qemu gives no host offset (nor host zeros) for an encrypted layer's data
        hidden = encrypted_depths(img)
        if not raw and not hidden:
            extents = split_host_holes(extents, chain_files(img))
        entries = map_entries(extents, raw, hidden, raw_depths(img))
    except InvalidArgumentError:
        entries = []
    finally:
        img.close()
    if not entries:
        entries = [{"start": start, "length": 0, "depth": 0, "present": False, "zero": False,
                    "data": False}]
    if args.output == "json":
        print("[" + ",\n".join(json_entry(e) for e in entries) + "]")
    else:
        print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
        for e in entries:
            if e["data"] and "offset" not in e:
                # The human format has no way to show them, as in qemu-img.
                print(f"{prog()}: File contains external, encrypted or compressed clusters.",
                      file=sys.stderr)
                return 1
            if e["data"] and not e["zero"]:       # qemu shows allocated zeros as holes
                print(f"{_hex(e['start']):<16}{_hex(e['length']):<16}{_hex(e['offset']):<16}"
                      f"{names[e['depth']]}")
    return 0


def layer_names(img, name):
    """File names of the chain's layers as qemu prints them."""
    names, top = [name], img
    while getattr(img, "header", None) is not None and img.header.backing_file \
            and img.backing is not None:
        names.append(shown_name(full_backing_filename(names[-1], img.header.backing_file),
                                img.backing))
        img = img.backing
    # data clusters of a layer with an external data file are in that file
    layers = [top] + list(getattr(top, "chain", None).layers if getattr(top, "chain", None)
                          else [])
    return [getattr(layer, "data_file_name", None) or n for layer, n in zip(layers, names)]


def encrypted_depths(img):
    """The depths of the chain's encrypted layers."""
    out, depth = set(), 0
    while img is not None:
        if getattr(img, "encryption", None) is not None:
            out.add(depth)
        img, depth = getattr(img, "backing", None), depth + 1
    return out


def raw_depths(img):
    """The depths of the chain's raw layers."""
    out, depth = set(), 0
    while img is not None:
        if getattr(img, "header", None) is None:
            out.add(depth)
        img, depth = getattr(img, "backing", None), depth + 1
    return out


def map_entries(extents, raw, hidden=(), raws=()):
    """Extents (or (extent, zero) pairs) -> qemu's map entries, merged as
    qemu-img merges them (no offset for the layers at depths ``hidden``;
    a hole of a raw layer at depths ``raws`` keeps its offset, as qemu's
    raw driver reports every range offset-valid)."""
    out = []
    for item in extents:
        e, host_zero = (item, None) if isinstance(item, Extent) else item
        entry = {"start": e.offset, "length": e.length, "depth": e.depth,
                 "present": e.kind != "unallocated",
                 # (unallocated in a device without a format: contents unknown, as
                 # qemu's null-co without read-zeroes; in a qcow2 chain: zeros)
                 "zero": e.kind == "zero" or (e.kind == "unallocated" and not raw)
                 or bool(host_zero),
                 # (a raw device's allocated zeros, an NBD export's ZERO without
                 # HOLE: data that reads as zeros, as qemu reports them)
                 "data": e.kind in ("data", "compressed") or
                 (raw and e.kind == "zero" and e.host_offset is not None)}
        if raw and e.kind != "unallocated":
            entry["offset"] = e.offset
        elif e.host_offset is not None and e.kind != "compressed" and e.depth not in hidden:
            entry["offset"] = e.host_offset
        elif e.kind == "zero" and e.depth in raws:
            entry["offset"] = e.offset
        if out and _mergeable(out[-1], entry):
            out[-1]["length"] += entry["length"]
        else:
            out.append(entry)
    return out


def _mergeable(a, b):
    if any(a[k] != b[k] for k in ("depth", "present", "zero", "data")):
        return False
    if ("offset" in a) != ("offset" in b):
        return False
    return "offset" not in a or a["offset"] + a["length"] == b["offset"]


def json_entry(e):
    keys = ["start", "length", "depth", "present", "zero", "data"] + \
        (["offset"] if "offset" in e else [])
    return "{ " + ", ".join(f'"{k}": {json.dumps(e[k])}' for k in keys) + "}"


def _hex(n):
    return f"{n:#x}" if n else "0"
