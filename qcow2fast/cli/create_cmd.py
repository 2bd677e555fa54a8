"""qcow2fast create [-f fmt] [-o options] [-b backing [-F fmt]] [-u] [-q] filename [size]"""

import os

from ..host import file as hostfile
from ..engine.backing import blkdebug_image, probe_format, resolve_backing_path
from ..errors import Qcow2Error
from ..host.null import is_null_name
from ..host.remote import is_url
from ..ops.options import AMEND_ONLY, QCOW2_OPTION_HELP
from .common import file_path
from .objects import lookup_secret, secrets
from .options import (OptionError, UsageError, cvtnum, error_exit, merge_options, opt_number,
                      opt_size, parse_bool)

# qemu-img's qcow2 creation options, with their help text (sorted, as qemu's).
QCOW2_OPTIONS = [(name, *help) for name, help in sorted(QCOW2_OPTION_HELP.items())
                 if name not in AMEND_ONLY]
# -o encrypt.* (create()'s ``encrypt`` dict, engine/crypto_setup.py).
ENCRYPT_OPTIONS = ("encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg",
                   "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg",
                   "encrypt.hash-alg", "encrypt.iter-time")
FORMATS = ("qcow2", "raw")
PROTOCOL_OPTIONS = ("nocow", "extent_size_hint")
# The file protocol's creation options, which qemu-img's -o help adds when
# it is given the target file name.
FILE_OPTIONS = [
    ("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
    ("nocow", "bool (on/off)", "Turn off copy-on-write (valid only on btrfs)"),
    ("preallocation", "str", "Preallocation mode (allowed values: off, falloc, full)"),
    ("size", "size", "Virtual disk size"),
]
RAW_OPTIONS = [("size", "size", "Virtual disk size")]
# qemu's luks format (ops/luks_create.py): its creation options in qemu's
# order (the "Formatting" line's), with -o help's text.
LUKS_OPTIONS = [
    ("key-secret", "str", "ID of the secret that provides the keyslot passphrase"),
    ("cipher-alg", "str", "Name of encryption cipher algorithm"),
    ("cipher-mode", "str", "Name of encryption cipher mode"),
    ("ivgen-alg", "str", "Name of IV generator algorithm"),
    ("ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    ("hash-alg", "str", "Name of encryption hash algorithm"),
    ("iter-time", "num", "Time to spend in PBKDF in milliseconds"),
]


def add_parser(sub):
    p = sub.add_parser("create", help="create a new image")
    p.expects("Expecting image file name", "Unexpected argument: {}")
    p.add_argument("-f", dest="fmt", default="raw")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-b", dest="backing")
    p.add_argument("-F", dest="backing_fmt")
    p.add_argument("-u", dest="unsafe", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("--object", dest="objects", action="append", default=[])
    from .common import add_untrusted_argument
    add_untrusted_argument(p)
    p.add_argument("filename", nargs="?")
    p.add_argument("size", nargs="?")
    p.set_defaults(run=run)


def format_error(fmt, filename=None):
    """The error for an output format this tool cannot create: qemu-img's
    own where qemu cannot either (an unknown name, a driver that creates
    nothing); ``filename`` prefixes it, as create's errors."""
    from ..ops.options import QEMU_DRIVERS, QEMU_NO_CREATE
    if fmt in QEMU_NO_CREATE:
        why = f"Format driver '{fmt}' does not support image creation"
    elif fmt not in QEMU_DRIVERS:
        why = f"Unknown file format '{fmt}'"
    else:
        why = f"format '{fmt}' is not supported by qcow2fast (supported: {', '.join(FORMATS)})"
    return UsageError(f"{filename}: {why}" if filename else why)


def options_help(fmt, filename=None):
    """qemu-img's -o help: the format's options; with the target's file
    name, merged with the file protocol's (the format's text wins), sorted."""
    own = {"qcow2": QCOW2_OPTIONS, "luks": LUKS_OPTIONS + RAW_OPTIONS}.get(fmt, RAW_OPTIONS)
    table = {name: (kind, text) for name, kind, text in own}
    if filename is not None:
        for name, kind, text in FILE_OPTIONS:
            table.setdefault(name, (kind, text))
    lines = [f"Supported {fmt} options:" if filename is None else "Supported options:"]
    for name in sorted(table):
        kind, text = table[name]
        lines.append(f"  {name + '=<' + kind + '>':<22} - {text}")
    if filename is None:
        lines += ["", "The protocol level may support further options.",
                  "Specify the target filename to include those options."]
    return "\n".join(lines) + "\n"


def run(args):
    from ..ops.create import create as create_image
    # "file", the protocol as a format, makes what raw makes: the file itself.
    if args.fmt not in FORMATS + ("file", "luks"):
        raise format_error(args.fmt, args.filename)
    opts = merge_options(args.options)
    if "help" in opts or "?" in opts:
        print(options_help(args.fmt, args.filename), end="")
        return 0
    if not args.filename:
        raise error_exit("Expecting image file name")
    # the file to make: a "file:" name (the protocol, named) is the path after it
    path = file_path(args.filename)
    size = opts.pop("size", None)
    if size is not None and args.size is not None:
        raise UsageError(f"{args.filename}: The image size must be specified only once")
    try:
        size = opt_size(size, "size") if size is not None else None
    except UsageError as e:
        raise UsageError(f"{args.filename}: {e}") from None
    if args.size is not None:
        size = cvtnum("image size", args.size)
    if args.fmt in ("raw", "file"):
        return create_raw_file(args, path, opts, size)
    if args.fmt == "luks":
        return create_luks_volume(args, path, opts, size)
    given = dict(opts)
    try:
        kw = qcow2_options(opts, secret_table=secrets(args.objects))
    except OptionError as e:
        raise UsageError(f"{args.filename}: {e}") from None
    if args.backing == "" or (args.backing is None and kw.get("backing_file") == ""):
        raise UsageError(f"{args.filename}: Expected backing file name, got empty string")
    backing = args.backing or kw.pop("backing_file", None)
    backing_fmt = args.backing_fmt or kw.pop("backing_format", None)
    kw.pop("backing_file", None)
    kw.pop("backing_format", None)
    if backing:
        # qemu-img 7.2's checks and messages: the backing file must open
        # (unless -u) and its format be given.
        # (create only takes the backing file's size: through a blkdebug
        # name, the size of the image it wraps)
        bpath = resolve_backing_path(path, blkdebug_image(backing) or backing)
        if size is None and args.unsafe:
            raise UsageError(f"{args.filename}: Image creation needs a size parameter")
        if not args.unsafe and not is_null_name(bpath) and not is_url(bpath) and \
                not os.path.exists(bpath):
            from ..engine.backing import qemu_name
            shown = qemu_name(path, backing)
            raise UsageError(f"{args.filename}: Could not open '{shown}': No such file or "
                             "directory\nCould not open backing image.")
        if backing_fmt is None and not args.unsafe:
            raise UsageError(f"{args.filename}: Backing file specified without backing format"
                             f"\nDetected format of {probe_format(bpath)}.")
        if not args.unsafe and backing_fmt not in FORMATS:
            raise UsageError(f"{args.filename}: backing format '{backing_fmt}' is not supported "
                             f"(supported: {', '.join(FORMATS)})\nCould not open backing image.")
    if size is None and not backing:
        raise UsageError(f"{args.filename}: Image creation needs a size parameter")
    if size is None and backing and not args.unsafe:
        from .common import open_image
        # qemu takes its size (no_io: an encrypted one opens without its
        # secret; shared: a running VM may write it, bdrv_img_create's force-share)
        below = open_image(bpath, backing_fmt, backing=False, no_io=True, force_share=True,
                           untrusted=args.untrusted)
        try:
            size = below.size
        finally:
            below.close()
    if not args.quiet:          # before the image is made, as qemu (also when it fails)
        print(formatting_line(args.filename, given, kw, size, backing, backing_fmt), flush=True)
    try:
        create_image(path, size, backing_file=backing, backing_format=backing_fmt, **kw)
    except Qcow2Error as e:         # qemu's create errors name the image first
        said = str(e)
        raise UsageError(said if said.startswith(f"{args.filename}: ")
                         else f"{args.filename}: {said}") from e
    return 0


def create_raw_file(args, path, opts, size):
    """create -f raw (or file): qemu's file-posix options, checks, line and
    messages; over ssh only the size (qemu's ssh driver has no other)."""
    allowed = () if is_url(path) else ("preallocation",)
    for key in opts:
        if key not in allowed:
            raise UsageError(f"{args.filename}: Invalid parameter '{key}'")
    if size is None:
        raise UsageError(f"{args.filename}: Image creation needs a size parameter")
    mode = opts.get("preallocation")
    if not args.quiet:
        print(f"Formatting '{args.filename}', fmt={args.fmt} size={size}" +
              (f" preallocation={mode}" if mode is not None else ""), flush=True)
    if mode == "metadata":
        raise UsageError(f"{args.filename}: Unsupported preallocation mode: metadata")
    if mode not in (None, "off", "falloc", "full"):
        raise UsageError(f"{args.filename}: invalid parameter value: {mode}")
    try:
        hostfile.create_raw(path, size, mode or "off")
    except OSError as e:
        raise UsageError(f"{args.filename}: {e.strerror}") from None
    return 0


def create_luks_volume(args, path, opts, size):
    """create -f luks: qemu's checks, "Formatting" line and messages."""
    from ..ops.luks_create import create_luks
    names = [name for name, _, _ in LUKS_OPTIONS]
    for key in opts:
        if key not in names + ["preallocation"]:
            raise UsageError(f"{args.filename}: Invalid parameter '{key}'")
    if args.backing is not None:
        raise UsageError(f"{args.filename}: Backing file not supported for file format 'luks'")
    if size is None:
        raise UsageError(f"{args.filename}: Image creation needs a size parameter")
    if not args.quiet:
        print(" ".join([f"Formatting '{args.filename}', fmt=luks size={size}"] +
                       [f"{key}={opts[key]}" for key in names + ["preallocation"]
                        if key in opts]), flush=True)
    try:
        if opts.get("preallocation", "off") != "off":
            raise UsageError(f"preallocation={opts['preallocation']} of a luks volume is not "
                             "supported by qcow2fast (only off)")
        if opts.get("key-secret") is None:
            raise UsageError("Parameter 'key-secret' is required for cipher")
        secret = lookup_secret(secrets(args.objects), opts["key-secret"])
        iter_time = encrypt_option("encrypt.iter-time", opts.get("iter-time", "2000"), None)
        create_luks(path, size, secret, **iter_time, **{
            key.replace("-", "_"): opts[key] for key in names[1:-1] if key in opts})
    except Qcow2Error as e:         # qemu's words: the option without "encrypt."
        said = str(e).replace("'encrypt.", "'")
        raise UsageError(f"{args.filename}: {said}") from e
    return 0


def formatting_line(filename, given, kw, size, backing, backing_fmt):
    """qemu-img's "Formatting" line: the options set or with a default, in
    the order qemu prints them, values as given (sizes in bytes)."""
    parts = [f"Formatting '{filename}', fmt=qcow2"]
    parts += [f"{key}={given[key]}" for key in ("encryption",) + ENCRYPT_OPTIONS if key in given]
    parts += [f"cluster_size={kw.get('cluster_size', 65536)}",
              f"extended_l2={given.get('extended_l2') or 'off'}"]
    if "preallocation" in given:
        parts.append(f"preallocation={given['preallocation']}")
    parts.append(f"compression_type={given.get('compression_type', 'zlib')}")
    if size is not None:
        parts.append(f"size={size}")
    if given.get("compat"):
        parts.append(f"compat={given['compat']}")
    if backing:
        parts.append(f"backing_file={backing.replace(',', ',,')}")
    if backing_fmt:
        parts.append(f"backing_fmt={backing_fmt}")
    if kw.get("data_file"):
        parts.append(f"data_file={kw['data_file']}")
    if "data_file_raw" in kw:
        parts.append(f"data_file_raw={'on' if kw['data_file_raw'] else 'off'}")
    parts.append(f"lazy_refcounts={given.get('lazy_refcounts') or 'off'}")
    parts.append(f"refcount_bits={kw.get('refcount_bits', 16)}")
    parts += [f"{key}={opt_size(given[key], key) if key == 'extent_size_hint' else given[key]}"
              for key in PROTOCOL_OPTIONS if key in given]
    return " ".join(parts)


def qcow2_options(opts, command="create", secret_table=None):
    """-o key=value pairs -> keyword arguments of qcow2fast.create
    (``encrypt.key-secret=ID`` looked up in ``secret_table``, the --object
    secrets)."""
    kw = {}
    for key, value in opts.items():
        if key in ENCRYPT_OPTIONS or key == "encryption":
            entry = encrypt_option(key, value, secret_table)
            if entry:                   # (encryption=off asks for nothing)
                kw.setdefault("encrypt", {}).update(entry)
            continue
        if key == "cluster_size":
            kw["cluster_size"] = opt_size(value, "cluster_size")
        elif key == "refcount_bits":
            kw["refcount_bits"] = opt_number(value, key)
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
        elif key in PROTOCOL_OPTIONS and command == "create":
            # The file protocol's hints (btrfs NOCOW, an XFS extent size):
            # checked as qemu does, not applied to the file.
            if key == "nocow":
                parse_bool(value, key)
            else:
                opt_size(value, key)
        else:
            raise OptionError(f"Invalid parameter '{key}'")
    return kw



def encrypt_option(key, value, secret_table):
    """One -o encrypt.* option -> its entry in create()'s ``encrypt`` dict."""
    if key == "encryption":         # qemu's legacy spelling of encrypt.format=aes
        return {"format": "aes"} if parse_bool(value, key) else {}
    name = key[len("encrypt."):].replace("-", "_")
    if name == "key_secret":
        return {name: lookup_secret(secret_table or {}, value)}
    if name == "iter_time":
        return {name: opt_number(value, key)}
    return {name: value}
