"""Opening images the way qemu-img does: -f or probing, --image-opts, -U
(qemu's image locks, host/lock.py), and --untrusted (engine/untrusted.py)."""

import contextlib
import os
import sys

from .. import open as open_qcow2
from ..engine.backing import FILE_PROTOCOL, probe_format
from ..errors import InvalidArgumentError, Qcow2Error
from ..host import blkdebug
from ..host.null import DRIVERS as NULL_DRIVERS, NullImage, is_null_name
from ..host.raw import RawImage
from ..host.remote import is_url
from ..errors import BadPassphraseError, MissingSecretError, SnapshotNotFoundError
from .objects import lookup_secret, secrets
from .options import (SIZE_HELP, OptionError, UsageError, cvtnum, opt_number, parse_bool, prog,
                      split_options, strtosz)

FORMATS = ("qcow2", "raw")
# The block drivers qemu 7.2 has: -f naming none of them is qemu's "Unknown
# driver"; one of them qcow2fast does not handle is said so.
QEMU_DRIVERS = ("blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress",
                "copy-before-write", "copy-on-read", "dmg", "file", "ftp", "ftps", "gluster",
                "host_cdrom", "host_device", "http", "https", "iscsi", "iser", "luks", "nbd",
                "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow",
                "qcow2", "qed", "quorum", "raw", "rbd", "replication", "snapshot-access", "ssh",
                "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat")

# --image-opts keys -> Image keyword arguments (sizes take suffixes).
IMAGE_OPTS = {"l2-cache-size": "l2_cache_size", "l2-cache-entry-size": "l2_cache_entry_size",
              "refcount-cache-size": "refcount_cache_size", "cache-size": "cache_size",
              "cache-clean-interval": "cache_clean_interval", "lazy-refcounts": "lazy_refcounts"}


def add_share_arguments(p, force_share=("-U", "--force-share")):
    """-U (read what another process writes), --untrusted and --object
    (secrets for encrypt.key-secret, cli/objects.py)."""
    p.add_argument(*force_share, dest="force_share", action="store_true")
    p.add_argument("--object", dest="objects", action="append", default=[],
                   metavar="TYPE,id=ID,...")
    add_untrusted_argument(p)


def add_untrusted_argument(p):
    p.add_argument("--untrusted", dest="untrusted", action="store_true",
                   help="the image comes from an untrusted source: no backing or data "
                        "file outside its directory, bounded memory and work")


def check_untrusted(name, fmt=None, image_opts=False, secrets=None):
    """For the commands whose operation opens the image itself (amend,
    commit, rebase): the untrusted-image rules on ``name`` and its whole
    backing chain, by opening it first read-only, shared, without I/O."""
    open_image(name, fmt, image_opts=image_opts, force_share=True, untrusted=True,
               secrets=secrets, no_io=True).close()


def share_options(args):
    """open_image's keyword arguments for the flags add_share_arguments adds."""
    return {"force_share": args.force_share, "untrusted": args.untrusted,
            "secrets": secrets(args.objects)}


def add_image_arguments(p, *, output=False):
    """-f (and, where qemu-img has --output, --format), -U, --image-opts..."""
    p.add_argument(*(("-f", "--format") if output else ("-f",)), dest="fmt")
    add_share_arguments(p)
    p.add_argument("--image-opts", dest="image_opts", action="store_true")
    if output:
        p.add_argument("--output", dest="output", default="human", choices=("human", "json"))


def image_option(key, value):
    """One of IMAGE_OPTS -> (the keyword argument, its value)."""
    arg = IMAGE_OPTS[key]
    if arg == "lazy_refcounts":
        return arg, parse_bool(value, key)
    if arg == "cache_clean_interval":
        return arg, parse_number(value, key)
    try:
        return arg, strtosz(value)
    except (ValueError, OverflowError):
        raise InvalidArgumentError(SIZE_HELP.format(key=key)) from None


def parse_number(value, key):
    """A QEMU_OPT_NUMBER option's value (qemu_strtou64), with qemu's message."""
    try:
        return opt_number(value, key)
    except OptionError as e:
        raise InvalidArgumentError(str(e)) from None


# Protocol nodes qcow2fast opens ("file", qemu's curl driver's http(s), its
# ssh driver), and the curl options it takes -> remote options (host/remote.py).
PROTOCOLS = ("file", "http", "https", "ssh")
CURL_OPTIONS = {"url": None, "timeout": "timeout", "readahead": "readahead"}


def flatten(value, prefix=""):
    """(dotted key, value) as qemu's qdict_flatten makes them (lists by index)."""
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else None
    if items is None:
        yield prefix[:-1], value
        return
    for key, item in items:
        yield from flatten(item, f"{prefix}{key}.")


def protocol_node(node):
    """(path or URL, remote options or None) of a protocol node: qemu's
    ``{"driver": "file", "filename": P}``, an ssh node (host/remote_ssh.py)
    or its curl driver's
    ``{"driver": "http"|"https", "url": U, "timeout": S, "readahead": N}``
    (``--image-opts file.driver=http,file.url=U`` or a ``json:`` name)."""
    driver = node.get("driver", "file")
    if driver not in PROTOCOLS:
        raise UsageError(f"protocol {driver!r} is not supported (supported: "
                         f"{', '.join(PROTOCOLS)})")
    for key in node:
        if driver == "file" and key not in ("driver", "filename"):
            raise UsageError(f"Block protocol 'file' doesn't support the option '{key}'")
    if driver == "file":
        return node.get("filename"), None
    if driver == "ssh":                 # qemu's ssh driver (host/remote_ssh.py)
        from ..host.remote_ssh import url_of
        try:
            return url_of(dict(flatten(node))), {}
        except InvalidArgumentError as e:
            raise UsageError(str(e)) from None
    for key in node:
        if key != "driver" and key not in CURL_OPTIONS:
            raise UsageError(f"Block protocol '{driver}' doesn't support the option '{key}'")
    url = node.get("url")
    if not isinstance(url, str) or not url.lower().startswith(driver + "://"):
        raise UsageError(f"Block protocol '{driver}' needs url={driver}://... "
                         f"(not {url!r})")
    remote = {}
    if "timeout" in node:
        t = str(node["timeout"])
        if not t.isdigit() or int(t) == 0:
            raise UsageError(f"Parameter 'timeout' expects a positive number of seconds, "
                             f"not {t!r}")
        remote["timeout"] = float(t)
    if "readahead" in node:
        remote["readahead"] = cvtnum("readahead", str(node["readahead"]))
    return url, remote


def file_path(name):
    """The path a filename names: after a ``file:`` prefix (the protocol,
    named), a relative path that would read as a protocol name (a colon
    before any slash: ``image:top``) written ``./image:top``, as qemu does."""
    if not name.startswith(FILE_PROTOCOL):
        return name
    path = name[len(FILE_PROTOCOL):]
    if ":" in path.split("/", 1)[0]:
        return "./" + path
    return path


def image_spec(name, fmt, image_opts, secret_table=None):
    """(path, format, open keyword arguments) for a filename or an
    --image-opts string (``encrypt.key-secret=ID`` looked up in
    ``secret_table``, the --object secrets)."""
    if not image_opts:
        return file_path(name), fmt, {}
    given = dict(split_options(name))
    if given.get("driver") in ("nbd", "ssh"):       # the node is the image
        return protocol_spec(name, given)
    kw, path, driver, proto = {}, None, fmt, {}
    secrets = {}            # layer depth -> secret (backing.encrypt.key-secret: depth 1)
    below = {}              # layer depth -> {"driver", "filename", "encrypt_format"} given
    backing_keys = []       # every backing.* key, in order
    for key, value in split_options(name):
        depth, rest = _backing_depth(key)
        if depth:
            backing_keys.append(key)
        if rest == "encrypt.key-secret":
            try:
                secrets[depth] = lookup_secret(secret_table or {}, value)
            except UsageError as e:
                # (qemu looks the secret up only when it reads: info opens without it)
                kw["missing_secret"] = f"Could not open '{name}': {e}"
        elif depth and rest in ("driver", "file.filename", "filename"):
            below.setdefault(depth, {})["driver" if rest == "driver" else "filename"] = value
        elif depth and rest == "file.driver" and value == "file":
            pass
        elif depth and rest == "encrypt.format":
            below.setdefault(depth, {})["encrypt_format"] = value
        elif key == "encrypt.format":       # checked against the header (resolve_image)
            kw["encrypt_format"] = value
        elif key in ("file.filename", "filename"):
            path = value
        elif key == "driver":
            driver = value
        elif key.startswith("file.") and key != "file.locking":
            proto[key[len("file."):]] = value
        elif key in ("file.locking", "locking"):
            if value not in ("on", "off", "auto"):
                raise UsageError(f"parameter '{key}' expects 'on', 'off' or 'auto'")
            kw["locking"] = value != "off"
        elif key in ("data-file.filename", "data-file"):   # qemu's data-file child
            kw["data_file"] = value
        elif key == "data-file.driver":
            if value != "file":
                raise UsageError(f"protocol {value!r} is not supported")
        elif key == "force-share":
            kw["force_share"] = parse_bool(value, key)
        elif key in IMAGE_OPTS:
            try:
                arg, kw[arg] = image_option(key, value)
            except InvalidArgumentError as e:
                raise UsageError(f"Could not open '{name}': {e}") from None
        elif value is None and key == next(iter(given)):
            # (qemu: a bare first word is the implied "file", a node's name)
            raise UsageError(f"Could not open '{name}': Cannot find device='{key}' nor "
                             f"node-name='{key}'")
        else:
            raise UsageError(f"unsupported image option {key!r}")
    if proto:
        url, remote = protocol_node(proto)
        if remote is not None:
            path, kw["remote"] = url, remote
    if path is None:
        raise UsageError("--image-opts needs file.filename=PATH (or file.driver=http, "
                         "file.url=URL)")
    if below:
        kw["backing_given"] = below
    if backing_keys:
        kw["backing_keys"] = backing_keys
    if secrets:     # one per layer, as qemu (engine/secret.ChainSecrets): the image's is
        kw["key_secret"] = secrets          # not its backing file's
    return path, driver, kw


def protocol_spec(name, options):
    """(URL, "raw", open keyword arguments) of qemu's nbd or ssh node
    options: the export or remote file read raw, which qemu-img info calls
    by the driver's name."""
    from ..host.remote_ssh import url_of as ssh_url_of
    from ..nbd.client import uri_of
    kw = {}
    if "force-share" in options:
        kw["force_share"] = parse_bool(options.pop("force-share"), "force-share")
    driver = options["driver"]
    try:
        if driver == "nbd":
            url, context = uri_of(options)
            kw["remote"] = {"nbd_context": context}
        else:
            url, kw["remote"] = ssh_url_of(options), {}
    except Qcow2Error as e:
        raise UsageError(f"Could not open '{name}': {e}" if driver == "ssh" else str(e)) \
            from None
    kw["shown_format"] = driver
    return url, "raw", kw


def _backing_depth(key):
    """"backing." * depth + rest -> (depth, rest): an option of the layer
    ``depth`` below the image (qemu's backing.* child options)."""
    depth = 0
    while key.startswith("backing."):
        key, depth = key[len("backing."):], depth + 1
    return depth, key


def resolve_image(name, fmt=None, image_opts=False, secret_table=None, no_io=False,
                  backing=True):
    """(path, format, open keyword arguments): the file must exist (a URL
    is a remote image, host/remote.py); the format is probed when not
    given, and must be one this tool handles.  ``no_io``: an image opened
    only for its metadata needs no secret, and an undefined one is no error.
    ``backing``: the chain will be opened (else a backing.* option is
    refused, as qemu refuses what an open leaves unused)."""
    path, fmt, kw = image_spec(name, fmt, image_opts, secret_table)
    backing_keys = kw.pop("backing_keys", None)
    missing = kw.pop("missing_secret", None)
    if missing and not no_io:
        raise UsageError(missing)
    if not is_url(path) and not os.path.exists(path):
        raise open_error(name, FileNotFoundError(2, "No such file or directory", path))
    try:
        fmt = fmt or probe_format(path, kw.get("remote"))
    except (Qcow2Error, OSError) as e:       # (a remote image: its connection)
        raise open_error(name, e) from e
    if fmt not in FORMATS:
        if fmt not in QEMU_DRIVERS:
            raise UsageError(f"Could not open '{name}': Unknown driver '{fmt}'")
        raise UsageError(f"unknown or unsupported format {fmt!r} (supported: qcow2, raw)")
    if "encrypt_format" in kw:
        why = encrypt_format_mismatch(path, fmt, kw.pop("encrypt_format"), kw.get("remote"))
        if why:
            raise UsageError(f"Could not open '{name}': {why}")
    if backing_keys and not backing:
        raise UsageError(f"Could not open '{name}': Block format '{fmt}' does not support "
                         f"the option '{qdict_first(backing_keys)}'")
    if "backing_given" in kw:
        check_backing_given(name, path, kw.pop("backing_given"))
    return path, fmt, kw


def qdict_order(keys):
    """``keys`` (inserted in this order) in the order qemu's QDict lists
    them (qobject/qdict.c: 512 buckets by tdb_hash, each bucket's latest
    insertion first): the order of qemu's messages and json: names."""
    def bucket(key):
        b = key.encode()
        value = (0x238F13AF * len(b)) & 0xFFFFFFFF
        for i, c in enumerate(b):
            value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
        return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512
    keys = list(keys)
    return sorted(keys, key=lambda k: (bucket(k), -keys.index(k)))


def qdict_first(keys):
    """The key of ``keys`` that qemu's QDict lists first, so names first in
    "does not support the option"."""
    return qdict_order(keys)[0]


def check_backing_given(name, path, given):
    """--image-opts ``backing.driver`` / ``backing.file.filename`` (and
    deeper): accepted when they name what the image's chain already has
    (qemu-iotests 198 spells its chain out so); another backing file at open
    is not supported."""
    from ..engine.backing import probe_format, read_head, resolve_backing_path
    from ..spec import header as hdr
    layer = path
    for depth in range(1, max(given) + 1):
        h = None
        if probe_format(layer) == "qcow2":
            h = hdr.parse_header(read_head(layer, 2 << 20), os.path.getsize(layer))
        if depth == 1 and h is not None and not h.backing_file and \
                h.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW and \
                given.keys() == {1} and set(given[1]) <= {"filename", "driver"}:
            # A backing node given to a data-file-raw image: its reads never
            # fall through (every cluster is in the raw data file), so the
            # node changes nothing; qemu opens it, so it must exist.
            if "filename" in given[1] and not os.path.exists(given[1]["filename"]):
                raise UsageError(f"Could not open '{name}': Could not open backing file: Could "
                                 f"not open '{given[1]['filename']}': No such file or "
                                 "directory")
            return
        if h is None or not h.backing_file:
            raise UsageError(f"Could not open '{name}': {'backing.' * depth}file.filename: the "
                             "image has no backing file there")
        below = resolve_backing_path(layer, h.backing_file)
        want = given.get(depth, {})
        if "filename" in want and os.path.realpath(want["filename"]) != os.path.realpath(below):
            raise UsageError(f"Could not open '{name}': {'backing.' * depth}file.filename "
                             f"{want['filename']!r} is not the image's backing file "
                             f"({h.backing_file!r}): another one at open is not supported")
        fmt = h.backing_format or probe_format(below)
        if "driver" in want and want["driver"] != fmt:
            raise UsageError(f"Could not open '{name}': {'backing.' * depth}driver "
                             f"{want['driver']!r} is not the backing file's format ({fmt!r})")
        why = "encrypt_format" in want and encrypt_format_mismatch(below, fmt,
                                                                   want["encrypt_format"])
        if why:
            raise UsageError(f"Could not open '{name}': "
                             f"{'Could not open backing file: ' * depth}{why}")
        layer = below


def crypt_method(path, remote=None):
    """The qcow2 header's crypt_method (0 for a file too short to have one)."""
    from ..engine.backing import read_head
    from ..spec import header as hdr
    end = hdr.FIELD_OFFSET["crypt_method"] + 4
    head = read_head(path, end, remote)
    return int.from_bytes(head[end - 4:end], "big") if len(head) >= end else 0


def encrypt_format_mismatch(path, fmt, want, remote=None):
    """qemu's check of ``encrypt.format`` in --image-opts against the
    header's crypt_method, before any secret is needed: what is wrong, or
    None."""
    from ..spec import luks as L
    if fmt != "qcow2":
        return f"Block format '{fmt}' does not support the option 'encrypt.format'"
    method = crypt_method(path, remote)
    have = {L.CRYPT_AES: "aes", L.CRYPT_LUKS: "luks"}.get(method)
    if method == L.CRYPT_NONE:
        return f"No encryption in image header, but options specified format '{want}'"
    if have is not None and have != want:     # (an unknown method: the open says)
        return f"Header reported '{have}' encryption format but options specify '{want}'"
    return None


def open_error(name, e):
    """qemu's error for an image that does not open: "Could not open 'NAME':
    why", where an OS error names the file again, and a corrupt image gets
    qemu's words for the condition when qemu has its own (CorruptImageError.qemu)."""
    why = getattr(e, "qemu", None) or (
        f"Could not open '{e.filename}': {e.strerror}"
        if isinstance(e, OSError) and e.filename and e.strerror else str(e))
    if isinstance(e, Qcow2Error) and why.startswith("Could not open '"):
        return UsageError(why)          # already said (open_image's, a lock held elsewhere)
    return UsageError(f"Could not open '{name}': {why}")


@contextlib.contextmanager
def named_as(names):
    """Inside: a backing file of the image at path P that does not open is
    reported under ``names[P]``, the name given (an --image-opts string is
    what qemu shows), for an operation that opens the images itself."""
    try:
        yield
    except (Qcow2Error, OSError) as e:
        if getattr(e, "opening", None) in names:
            e.opening = names[e.opening]
        raise


def snapshot_spec(text):
    """qemu-img's ``-l`` argument: ``snapshot.id=ID[,snapshot.name=NAME]``
    (either key) or a bare id-or-name; the value :func:`qcow2fast.open` takes."""
    if text is None or not text.startswith("snapshot."):
        return text
    spec = {}
    for key, value in split_options(text):
        if key not in ("snapshot.id", "snapshot.name"):
            raise UsageError(f"invalid snapshot parameter {key!r} in {text!r} "
                             "(expected snapshot.id and/or snapshot.name)")
        spec[key[len("snapshot."):]] = value
    return spec


def snapshot_not_found(e):
    """-l naming no snapshot, in qemu's words (the API's names which)."""
    return UsageError(f"Failed to load snapshot: {e.qemu}")


def open_image(name, fmt=None, *, image_opts=False, writable=False, backing=True,
               snapshot=None, force_share=False, untrusted=False, secrets=None, **extra):
    """Open ``name`` as qcow2 or raw (probed when ``fmt`` is None), at the
    internal ``snapshot`` (a -l argument) if one is given.  An encrypted
    image needs ``encrypt.key-secret=ID`` in --image-opts (``secrets``: the
    --object secrets), as in qemu-img.  A ``json:`` name opens the nodes it
    describes (cli/json_filename.py)."""
    from .json_filename import is_json, open_json
    if is_json(name) and not image_opts and snapshot is None:
        return open_json(name, writable=writable, fmt=fmt, force_share=force_share,
                         **({} if backing else {"backing": False}))
    if image_opts and any(k.split(".")[-1] == "driver" and v == "blkdebug"
                          for k, v in split_options(name)):   # (json_filename's nodes)
        from ..engine.backing import nested
        return open_json(name, writable=writable, fmt=fmt, force_share=force_share,
                         tree=nested(dict(split_options(name))))
    if not image_opts and blkdebug.is_blkdebug_name(name):
        return open_blkdebug_name(name, fmt, writable=writable, backing=backing,
                                  snapshot=snapshot, force_share=force_share,
                                  untrusted=untrusted, secrets=secrets, **extra)
    if image_opts and force_share and \
            not parse_bool(dict(split_options(name)).get("force-share", "on"), "force-share"):
        raise UsageError("--force-share/-U conflicts with image options")
    null = open_null(name, fmt, image_opts, writable)
    if null is not None:
        return null
    path, fmt, kw = resolve_image(name, fmt, image_opts, secrets, no_io=extra.get("no_io"),
                                  backing=backing)
    share = {"force_share": kw.pop("force_share", force_share),
             "locking": kw.pop("locking", True)}
    if fmt == "raw":
        remote = kw.pop("remote", None)
        shown = kw.pop("shown_format", "raw")
        if kw:
            raise UsageError("cache options apply to qcow2 images only")
        if snapshot is not None:
            raise UsageError("raw images have no internal snapshots")
        try:
            img = RawImage(path, writable=writable, remote=remote, **share)
        except (Qcow2Error, OSError) as e:
            raise open_error(name, e) from e
        img.format = shown
        return img
    kw.update(share, untrusted=untrusted)
    kw.update(extra)
    if snapshot is not None:
        kw["snapshot"] = snapshot_spec(snapshot)
    try:
        img = open_qcow2(path, "r+" if writable else "r", backing=backing,
                         cache_clean_interval=kw.pop("cache_clean_interval", 0), **kw)
    except (MissingSecretError, BadPassphraseError) as e:
        raise type(e)(f"Could not open '{name}': {getattr(e, 'qemu', None) or e}") from None
    except SnapshotNotFoundError as e:
        raise snapshot_not_found(e) from None
    except (Qcow2Error, OSError) as e:
        raise open_error(name, e) from e
    warn_stale_bitmaps(img.dirty_bitmaps.warning)
    return img


def open_blkdebug_name(name, fmt, **kw):
    """``blkdebug:RULES:IMAGE``: the qcow2 image IMAGE over qemu's
    error-injection filter (host/blkdebug.py) with the rules of the file
    RULES; errors are said of the whole name, as qemu says them."""
    try:
        config, inner = blkdebug.split_name(name)
        rules = blkdebug.rules_from({"config": config})
    except Qcow2Error as e:
        raise open_error(name, e) from e
    if (fmt or (probe_format(inner) if os.path.exists(inner) else "qcow2")) != "qcow2":
        raise UsageError(f"Could not open '{name}': blkdebug over a raw image is not "
                         "supported")
    try:
        return open_image(inner, fmt, blkdebug=rules, **kw)
    except UsageError as e:
        raise UsageError(f"Could not open '{name}': {e}") from None


def open_null(name, fmt, image_opts, writable):
    """The null device (host/null.py) that ``name`` (a filename or
    --image-opts) names, open; None when it names something else."""
    if image_opts:
        opts = dict(split_options(name))
        if opts.get("driver") not in NULL_DRIVERS:
            return None
        opts.pop("force-share", None)       # nothing to share or lock
    elif is_null_name(name):
        opts = {"driver": name[:-len("://")]}
        if fmt not in (None, "raw", opts["driver"]):
            raise UsageError(f"Could not open '{name}': Image is not in {fmt} format")
        fmt = fmt or "raw"                  # qemu probes the protocol's zeros: raw
    else:
        return None
    try:
        return NullImage.from_options(opts, writable=writable, fmt=fmt, json_name=json_name)
    except Qcow2Error as e:
        raise open_error(name, e) from e


def json_name(options):
    """qemu's ``json:`` name of a node with these options (its QDict order)."""
    import json

    def ordered(value):
        if isinstance(value, list):
            return [ordered(v) for v in value]
        if isinstance(value, dict):
            return {key: ordered(value[key]) for key in qdict_order(value)}
        return value
    return "json:" + json.dumps(ordered(options))


def warn_stale_bitmaps(warning):
    """qemu's warning (no newline at its end, as qemu prints it) when an
    image's bitmaps were disowned by a program that does not know them."""
    if warning:
        print(f"{prog()}: warning: {warning}", end="", file=sys.stderr, flush=True)
