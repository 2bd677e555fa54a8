"""qcow2fast info [-f fmt] [--output=human|json] [--backing-chain] [-U] [--image-opts] filename

The JSON has qemu-img 7.2's keys and values."""

import json
import os
import re
import time

from ..engine.backing import JSON_PREFIX, identity, probe_format, resolve_backing_path
from ..errors import CorruptImageError, InvalidArgumentError, Qcow2Error
from ..host.null import NullImage
from ..host.remote import is_url
from ..host.remote import join as remote_join
from ..spec import datafile as dfspec
from .common import add_image_arguments, file_path, open_error, open_image, share_options
from .json_filename import is_json, parse, shown_name
from .refresh import has_directory, refreshed_name, size_known
from .luks_info import is_luks, luks_info
from .options import UsageError, size_to_str, split_options


def add_parser(sub):
    p = sub.add_parser("info", help="show information about an image")
    p.expects("Expecting one image file name")
    add_image_arguments(p, output=True)
    p.add_argument("--backing-chain", dest="backing_chain", action="store_true")
    p.add_argument("filename")
    p.set_defaults(run=run)


def run(args):
    infos = []
    name, fmt, seen = args.filename, args.fmt, set()
    luks = not args.image_opts and fmt in (None, "luks") and is_luks(file_path(name))
    if luks:                                    # a LUKS volume (it has no backing file)
        infos.append(luks_info(file_path(name), name))
    while not luks:
        img = open_image(name, fmt, image_opts=args.image_opts and not infos, backing=False,
                         no_io=True, **share_options(args), **metadata_only(name, fmt, args))
        try:
            opts = args.image_opts and not infos
            # (a json: name shows as qemu refreshes it; a backing file's
            # actual path is still beside the image's file)
            info = image_info(img, opts_name(name, img) if opts else info_name(name, img),
                              base=(img.path if has_directory(parse(name)) else False)
                              if is_json(name) else None)
            if is_json(name) and not size_known(parse(name)):
                info.pop("actual-size", None)       # "disk size: unavailable"
        except CorruptImageError as e:      # bitmaps load lazily; qemu reads them at open
            raise open_error(name, e) from e
        finally:
            img.close()
        infos.append(info)
        if not args.backing_chain or "backing-filename" not in info:
            break
        seen.add(identity(img.path))
        name = info["full-backing-filename"]
        if identity(resolve_backing_path(img.path, info["backing-filename"])) in seen:
            raise UsageError(f"Backing file '{name}' creates an infinite loop.")
        fmt = info.get("backing-filename-format") or probe_format(name)
    if args.output == "json":
        print(_empty_lists_as_qemu(json.dumps(infos if args.backing_chain else infos[0],
                                              indent=4)))
    else:
        print("\n".join(human_info(i) for i in infos), end="")
    return 0


def opts_name(spec, img):
    """The name qemu shows for an --image-opts image: the file's, unless a
    "strong" option of the format is given (here: encrypt.key-secret), which
    only a json: name can say (qemu's bdrv_refresh_filename, its key order)."""
    opts = dict(split_options(spec))
    opts.pop("force-share", None)
    for prefix in ("", "file."):        # an ssh node names itself (host/remote_ssh.py)
        if opts.get(prefix + "driver") == "ssh" and "encrypt.key-secret" not in opts:
            from ..host.remote_ssh import node_name
            return node_name({k[len(prefix):]: v for k, v in opts.items()
                              if k.startswith(prefix)})
    if "encrypt.key-secret" not in opts:
        return img.path
    return "json:" + json.dumps({"encrypt.key-secret": opts["encrypt.key-secret"],
                                 "driver": opts.get("driver", "qcow2"),
                                 "file": {"driver": "file", "filename": img.path}})


def _allocated(img):
    """Bytes allocated to the image's file (a quorum node: its children's,
    qemu's sum for a node whose driver does not say)."""
    children = getattr(getattr(getattr(img, "file", None), "reader", None), "files", None)
    if children is not None:
        return sum(os.fstat(f.fd).st_blocks for f in children) * 512
    return os.stat(img.path).st_blocks * 512


def info_name(name, img):
    """The name qemu-img info shows for the image opened as ``name``."""
    if is_json(name):
        fmt = getattr(img, "format", None) or (
            "qcow2" if getattr(img, "header", None) is not None else "raw")
        refreshed = refreshed_name(parse(name), fmt)
        if refreshed is not None:
            return refreshed
    return shown_name(name, img)


def image_info(img, name, base=None):
    """qemu-img's ImageInfo for an open image, as a dict (``base``: the
    name backing file names are relative to, when not ``name``; False when
    there is none)."""
    # A remote file's allocated size is unknown (qemu: "disk size: unavailable").
    actual = {"actual-size": 0} if isinstance(img, NullImage) else \
        {} if is_url(img.path) else {"actual-size": _allocated(img)}
    info = {}
    if getattr(img, "header", None) is None:          # raw, or a null device
        fmt = getattr(img, "format", "raw")
        info.update({"virtual-size": img.size, "filename": name, "format": fmt, **actual})
        # (a local file's get_info says it; qemu's null, nbd, curl and quorum
        # drivers have none)
        if not isinstance(img, NullImage) and not is_url(img.path) and \
                not hasattr(getattr(img, "file", None), "reader"):
            info["dirty-flag"] = False
        return info
    h = img.header
    if img.snapshots:
        info["snapshots"] = [snapshot_info(s) for s in img.snapshots]
    if h.backing_format:
        info["backing-filename-format"] = h.backing_format
    info.update({"virtual-size": img.size, "filename": name, "cluster-size": img.cluster_size,
                 "format": "qcow2", **actual})
    data = {"compat": "1.1" if h.version >= 3 else "0.10",
            "compression-type": img.compression_type}
    if h.version >= 3:
        data["lazy-refcounts"] = img.lazy_refcounts
        if img.bitmaps:
            data["bitmaps"] = [{"flags": b.flags, "name": b.name, "granularity": b.granularity}
                               for b in img.bitmaps]
        data["refcount-bits"] = h.refcount_bits
        data.update(datafile_info(h))
        data.update({"corrupt": img.corrupt, "extended-l2": img.geo.extended_l2})
    else:
        data["refcount-bits"] = h.refcount_bits
    enc = getattr(img, "encryption", None)
    if enc is not None:         # after refcount-bits, as qemu-img 7.2 orders it
        data = dict(sum(([(k, v)] + ([("encrypt", enc.info())] if k == "refcount-bits" else [])
                         for k, v in data.items()), []))
    info["format-specific"] = {"type": "qcow2", "data": data}
    if h.backing_file:
        try:                            # (base False: no directory: a quorum node)
            if base is not False:
                info["full-backing-filename"] = full_backing_filename(base or name,
                                                                      h.backing_file)
        except InvalidArgumentError:    # (none either: an ssh:// name with host_key_check)
            pass
        info["backing-filename"] = h.backing_file
    if enc is not None:
        info["encrypted"] = True
    info["dirty-flag"] = img.dirty
    return info


def datafile_info(h):
    """The data file keys of qemu's ImageInfoSpecificQCow2."""
    if not dfspec.has_data_file(h):
        return {}
    name = dfspec.data_file_name(h)
    return ({"data-file": name} if name is not None else {}) | \
        {"data-file-raw": dfspec.is_raw(h)}


def metadata_only(name, fmt, args):
    """qemu-img info does no I/O on the data: an image whose data file is
    missing is still described (its data reads as zeros, from /dev/null)."""
    if args.image_opts or fmt not in (None, "qcow2"):
        return {}
    try:
        from ..engine.datafile import resolve as resolve_data_file
        from ..spec import header as hdr
        with open(name, "rb") as f:
            head = f.read(2 << 20)
        h = hdr.parse_header(head, os.path.getsize(name))
        if not dfspec.has_data_file(h) or dfspec.data_file_name(h) is None:
            return {}
        if os.path.exists(resolve_data_file(name, dfspec.data_file_name(h))):
            return {}
    except (OSError, Qcow2Error):
        return {}           # the open below says what is wrong
    return {"data_file": os.devnull}


def _empty_lists_as_qemu(text):
    """qemu prints an empty list (a bitmap's flags) over two lines."""
    return re.sub(r'^( *)(".*": )\[\]', lambda m: f"{m[1]}{m[2]}[\n{m[1]}]", text,
                  flags=re.M)


def _dump(lines, key, value, indent):
    """qemu's human dump of a nested value (dump_qobject)."""
    pad = " " * indent
    if isinstance(value, bool):
        value = "true" if value else "false"
    if isinstance(value, dict):
        lines.append(f"{pad}{key.replace('-', ' ')}:")
        for k, v in value.items():
            _dump(lines, k, v, indent + 4)
        return
    if isinstance(value, list):
        lines.append(f"{pad}{key.replace('-', ' ')}:")
        for i, item in enumerate(value):
            if isinstance(item, (dict, list)):
                lines.append(f"{pad}    [{i}]:")
                for k, v in item.items():
                    _dump(lines, k, v, indent + 8)
            else:
                lines.append(f"{pad}    [{i}]: {item}")
        return
    lines.append(f"{pad}{key.replace('-', ' ')}: {value}")


def full_backing_filename(name, backing):
    """qemu's path_combine: relative to the directory of the name given."""
    if is_url(name) or is_url(backing):
        return remote_join(name, backing)
    if os.path.isabs(backing) or backing.startswith(JSON_PREFIX):    # json: is a protocol
        return backing
    return os.path.join(os.path.dirname(name), backing)


def snapshot_info(s):
    out = {}
    if s.icount is not None:
        out["icount"] = s.icount
    out.update({"vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000, "name": s.name,
                "date-sec": s.date_sec, "date-nsec": s.date_nsec,
                "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000, "id": s.id,
                "vm-state-size": s.vm_state_size})
    return out


def snapshot_list(snapshots):
    """qemu's "Snapshot list:" table (bdrv_snapshot_dump), from
    snapshot_info dicts, as lines."""
    lines = ["Snapshot list:",
             f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        secs = s["vm-clock-sec"]
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
                 f"{s['vm-clock-nsec'] // 1_000_000:03d}")
        icount = str(s["icount"]) if "icount" in s else ""
        lines.append(f"{s['id']:<9} {s['name']:<16} {size_to_str(s['vm-state-size']):>8}"
                     f"{date:>20}{clock:>13}{icount:>11}")
    return lines


def human_info(info):
    lines = [f"image: {info['filename']}", f"file format: {info['format']}",
             f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
             "disk size: " + (size_to_str(info["actual-size"]) if "actual-size" in info
                              else "unavailable")]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if "full-backing-filename" not in info:
            line += " (cannot determine actual path)"
        elif info["full-backing-filename"] != info["backing-filename"]:
            line += f" (actual path: {info['full-backing-filename']})"
        lines.append(line)
    if "backing-filename-format" in info:
        lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if info.get("snapshots"):
        lines += snapshot_list(info["snapshots"])
    fs = info.get("format-specific")
    if fs:
        lines.append("Format specific information:")
        for key, value in fs["data"].items():
            _dump(lines, key, value, 4)
    return "\n".join(lines) + "\n"
