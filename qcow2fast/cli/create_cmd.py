"""qcow2fast create [-f fmt] [-o options] [-b backing [-F fmt]] [-u] [-q] filename [size]"""

import os

from ..host import file as hostfile
from ..engine.backing import probe_format, resolve_backing_path
from .objects import lookup_secret, secrets
from .options import UsageError, merge_options, parse_bool, parse_size

# qemu-img's qcow2 creation options this version supports, with their help text.
QCOW2_OPTIONS = [
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("cluster_size", "size", "qcow2 cluster size"),
    ("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("compression_type", "str", "Compression method used for image cluster compression"),
    ("data_file", "str", "File name of an external data file"),
    ("data_file_raw", "bool (on/off)", "The external data file must stay valid as a raw image"),
    ("extended_l2", "bool (on/off)", "Extended L2 tables"),
    ("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
    ("preallocation", "str", "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    ("refcount_bits", "num", "Width of a reference count entry in bits"),
    ("size", "size", "Virtual disk size"),
]
# -o encrypt.* (create()'s ``encrypt`` dict, engine/crypto_setup.py).
ENCRYPT_OPTIONS = ("encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg",
                   "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg",
                   "encrypt.hash-alg", "encrypt.iter-time")
FORMATS = ("qcow2", "raw")


def add_parser(sub):
    p = sub.add_parser("create", help="create a new image")
    p.add_argument("-f", dest="fmt", default="raw")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-b", dest="backing")
    p.add_argument("-F", dest="backing_fmt")
    p.add_argument("-u", dest="unsafe", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("--object", dest="objects", action="append", default=[])
    p.add_argument("filename", nargs="?")
    p.add_argument("size", nargs="?")
    p.set_defaults(run=run)


def options_help(fmt):
    if fmt == "raw":
        return "Supported raw options:\n  size=<size>            - Virtual disk size\n"
    lines = [f"Supported {fmt} options:"]
    for name, kind, text in QCOW2_OPTIONS:
        lines.append(f"  {name + '=<' + kind + '>':<22} - {text}")
    return "\n".join(lines) + "\n"


def run(args):
    from ..ops.create import create as create_image
    if args.fmt not in FORMATS:
        raise UsageError(f"create: unknown or unsupported format {args.fmt!r} "
                         f"(supported: {', '.join(FORMATS)})")
    opts = merge_options(args.options)
    if "help" in opts or "?" in opts:
        print(options_help(args.fmt), end="")
        return 0
    if not args.filename:
        raise UsageError("create: expecting a filename")
    size = opts.pop("size", None)
    if args.size is not None:
        size = args.size
    size = parse_size(size, "image size") if size is not None else None
    if args.fmt == "raw":
        if opts:
            raise UsageError(f"create: invalid parameter {next(iter(opts))!r} for format raw")
        if size is None:
            raise UsageError("create: image size must be specified")
        hostfile.create_raw(args.filename, size)
        if not args.quiet:
            print(f"Formatting '{args.filename}', fmt=raw size={size}")
        return 0
    kw = qcow2_options(opts, secret_table=secrets(args.objects))
    backing = args.backing or kw.pop("backing_file", None)
    backing_fmt = args.backing_fmt or kw.pop("backing_format", None)
    kw.pop("backing_file", None)
    kw.pop("backing_format", None)
    if backing:
        # qemu-img 7.2's checks and messages: the backing file must open
        # (unless -u) and its format be given.
        bpath = resolve_backing_path(args.filename, backing)
        if size is None and args.unsafe:
            raise UsageError(f"{args.filename}: Image creation needs a size parameter")
        if not args.unsafe and not os.path.exists(bpath):
            from ..ops.layers import qemu_name
            shown = qemu_name(args.filename, backing)
            raise UsageError(f"{args.filename}: Could not open '{shown}': No such file or "
                             "directory\nCould not open backing image.")
        if backing_fmt is None and not args.unsafe:
            raise UsageError(f"{args.filename}: Backing file specified without backing format"
                             f"\nDetected format of {probe_format(bpath)}.")
        if not args.unsafe and backing_fmt not in FORMATS:
            raise UsageError(f"{args.filename}: backing format '{backing_fmt}' is not supported "
                             f"(supported: {', '.join(FORMATS)})\nCould not open backing image.")
    create_image(args.filename, size, backing_file=backing, backing_format=backing_fmt, **kw)
    if not args.quiet:
        from .. import open as open_image
        with open_image(args.filename, backing=False, cache_clean_interval=0, no_io=True) as img:
            size = img.size
        # qemu-img's order: the order of qcow2's creation options.
        parts = [f"Formatting '{args.filename}', fmt=qcow2"]
        parts += [f"{k}={opts[k]}" for k in ENCRYPT_OPTIONS if k in opts]    # qemu's order
        parts += [f"cluster_size={kw.get('cluster_size', 65536)}",
                  f"extended_l2={'on' if kw.get('extended_l2') else 'off'}"]
        if kw.get("preallocation", "off") != "off":
            parts.append(f"preallocation={kw['preallocation']}")
        parts += [f"compression_type={kw.get('compression_type', 'zlib')}", f"size={size}"]
        if kw.get("compat"):
            parts.append(f"compat={kw['compat']}")
        if backing:
            parts.append(f"backing_file={backing}")
        if backing_fmt:
            parts.append(f"backing_fmt={backing_fmt}")
        if kw.get("data_file"):
            parts.append(f"data_file={kw['data_file']}")
        if "data_file_raw" in kw:
            parts.append(f"data_file_raw={'on' if kw['data_file_raw'] else 'off'}")
        parts.append(f"lazy_refcounts={'on' if kw.get('lazy_refcounts') else 'off'}")
        parts.append(f"refcount_bits={kw.get('refcount_bits', 16)}")
        print(" ".join(parts))
    return 0


def qcow2_options(opts, command="create", secret_table=None):
    """-o key=value pairs -> keyword arguments of qcow2fast.create
    (``encrypt.key-secret=ID`` looked up in ``secret_table``, the --object
    secrets)."""
    kw = {}
    for key, value in opts.items():
        if key in ENCRYPT_OPTIONS or key == "encryption":
            kw.setdefault("encrypt", {}).update(encrypt_option(key, value, secret_table))
            continue
        if key.startswith("encrypt."):
            raise UsageError(f"{command}: invalid parameter '{key}' for format qcow2 "
                             "(see -o help)")
        if value is None and key not in ("lazy_refcounts", "extended_l2"):
            raise UsageError(f"{command}: parameter '{key}' needs a value")
        if key == "cluster_size":
            kw["cluster_size"] = parse_size(value, "cluster_size")
        elif key == "refcount_bits":
            try:
                kw["refcount_bits"] = int(value)
            except ValueError:
                raise UsageError(f"{command}: refcount_bits expects a number, not {value!r}") from None
        elif key == "compat":
            kw["compat"] = {"v2": "0.10", "v3": "1.1"}.get(value, value)
        elif key == "lazy_refcounts":
            kw["lazy_refcounts"] = parse_bool(value, key)
        elif key in ("extended_l2", "data_file_raw"):
            kw[key] = parse_bool(value, key)
        elif key == "data_file":
            kw["data_file"] = value
        elif key in ("compression_type", "preallocation"):
            kw[key] = value
        elif key == "backing_file":
            kw["backing_file"] = value
        elif key == "backing_fmt":
            kw["backing_format"] = value
        else:
            raise UsageError(f"{command}: invalid parameter '{key}' for format qcow2 "
                             "(see -o help)")
    return kw



def encrypt_option(key, value, secret_table):
    """One -o encrypt.* option -> its entry in create()'s ``encrypt`` dict."""
    if key == "encryption":         # qemu's legacy spelling of encrypt.format=aes
        return {"format": "aes"} if parse_bool(value, key) else {}
    name = key[len("encrypt."):].replace("-", "_")
    if value is None:
        raise UsageError(f"parameter '{key}' needs a value")
    if name == "key_secret":
        return {name: lookup_secret(secret_table or {}, value)}
    if name == "iter_time":
        try:
            return {name: int(value)}
        except ValueError:
            raise UsageError(f"Parameter '{key}' expects a number") from None
    return {name: value}
