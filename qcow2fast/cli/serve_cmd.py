"""qcow2fast serve [OPTIONS] FILE -- qemu-nbd's server options and meaning:

  -k/--socket PATH, -b/--bind ADDR (default localhost), -p/--port N (10809)
  -e/--shared N (clients at once, default 1, 0 no limit), -t/--persistent
  -r/--read-only, -x/--export-name NAME, -D/--description TEXT
  -o/--offset N, -A/--allocation-depth, -B/--bitmap NAME (repeatable)
  -f/--format FMT, --image-opts, FILE or json:{...} (cli/json_filename.py)
  --cache MODE, -n/--nocache, --aio MODE, --discard MODE, --detect-zeroes MODE
  --object tls-creds-x509,id=ID,dir=DIR,endpoint=server --tls-creds ID
  --fork, --pid-file PATH, -v/--verbose, -V/--version
  -l/--load-snapshot SNAP (read-only), -s/--snapshot (a temporary overlay)
  -L/--list (the exports of the server at -k or -b/-p)

Served on a Unix socket, on TCP, or on the socket passed by systemd-style
socket activation (LISTEN_FDS, e.g. ``nbdinfo -- [ qcow2fast serve disk ]``).
As qemu-nbd: the server exits when its last client disconnects unless
``--persistent``; with ``-k`` the ``-b``/``-p`` options are ignored;
``--discard`` defaults to ``ignore`` (TRIM does nothing); multi-conn is
advertised unless ``--shared`` is 1.  SIGTERM and SIGINT stop it cleanly
(the image is flushed and closed).  Usage errors are qemu-nbd's: glibc
getopt's words (options.QemuNbdWords), then its checks in its order.
Deliberate differences: ``-b`` defaults to localhost, not every
interface; -c/-d, --selinux-label and -T are refused or warned of as a
qemu-nbd built without them does."""

import argparse
import logging
import os
import signal
import sys
import threading

from .. import __version__
from ..errors import Qcow2Error
from ..host.window import RawWindow
from .common import add_share_arguments, open_image, share_options
from .options import SIZE_HELP, QemuNbdWords, UsageError, strtou64

QEMU_NBD_VERSION = "7.2.0"          # the qemu-nbd whose options and behaviour serve follows
AIO_MODES = ("threads", "native", "io_uring")      # accepted; requests run on threads
CACHE_ALIASES = {"off": "none"}     # qemu's bdrv_parse_cache_mode
NBD_MAX_STRING_SIZE = 4096          # export names and descriptions (qemu-nbd's bound)


def add_parser(sub):
    p = sub.add_parser("serve", help="serve an image over NBD (qemu-nbd's options)")
    p.words = QemuNbdWords              # usage errors in qemu-nbd's (glibc getopt's) words
    # qemu-nbd's options, in its table's order (getopt_long lists an
    # ambiguous abbreviation's candidates in it); each checked as it is
    # read, in the order given, as qemu-nbd does.
    p.add_argument("-V", "--version", action=_Version, nargs=0)
    p.add_argument("-b", "--bind", dest="host", metavar="HOST")
    p.add_argument("-p", "--port", dest="port", metavar="N")
    _checked(p, "-k", "--socket", dest="socket_path", metavar="PATH", check=_socket_path)
    _checked(p, "-o", "--offset", dest="offset", default=0, metavar="OFFSET", check=_offset)
    p.add_argument("-r", "--read-only", dest="read_only", action="store_true")
    p.add_argument("-A", "--allocation-depth", dest="allocation_depth", action="store_true")
    p.add_argument("-B", "--bitmap", dest="bitmaps", action="append", default=[],
                   metavar="NAME")
    p.add_argument("-c", "--connect", dest="device", metavar="DEV")
    p.add_argument("-d", "--disconnect", dest="disconnect", action="store_true")
    p.add_argument("-L", "--list", dest="list", action="store_true")
    p.add_argument("-s", "--snapshot", dest="temp_overlay", action="store_true",
                   help="writes go to a temporary overlay, deleted at exit")
    _checked(p, "-l", "--load-snapshot", dest="snapshot", metavar="SNAPSHOT",
             check=_load_snapshot)
    _checked(p, "-n", "--nocache", dest="cache_mode", nargs=0, check=_nocache)
    _checked(p, "--cache", dest="cache_mode", metavar="MODE", check=_cache)
    _checked(p, "--aio", dest="aio", metavar="MODE", check=_aio)
    _checked(p, "--discard", dest="discard", default="ignore", metavar="MODE", check=_discard)
    _checked(p, "--detect-zeroes", dest="detect_zeroes", default="off", metavar="MODE",
             check=_detect_zeroes)
    _checked(p, "-e", "--shared", dest="shared", default=1, metavar="N", check=_shared,
             help="serve at most N clients at once (default 1, 0: no limit)")
    p.add_argument("-f", "--format", dest="fmt")
    p.add_argument("-t", "--persistent", dest="persistent", action="store_true",
                   help="keep serving after the last client disconnects")
    p.add_argument("-v", "--verbose", dest="verbose", action="store_true")
    add_share_arguments(p, ("-U",))     # --object (and qcow2fast's -U, --untrusted)
    _checked(p, "-x", "--export-name", dest="export_name", default="", metavar="NAME",
             check=_bounded("export name"))
    _checked(p, "-D", "--description", dest="description", metavar="TEXT",
             check=_bounded("export description"))
    p.add_argument("--tls-creds", dest="tls_creds", metavar="ID")
    p.add_argument("--tls-hostname", dest="tls_hostname", metavar="NAME")
    p.add_argument("--tls-authz", dest="tls_authz", metavar="ID")
    p.add_argument("--image-opts", dest="image_opts", action="store_true")
    _checked(p, "-T", "--trace", dest="trace", metavar="EVENTS", check=_trace)
    p.add_argument("--fork", dest="fork", action="store_true")
    p.add_argument("--pid-file", dest="pid_file", metavar="PATH")
    p.add_argument("--selinux-label", dest="selinux_label", metavar="LABEL")
    p.add_argument("filenames", nargs="*", metavar="filename")
    p.set_defaults(run=run, seen=set())


class _Version(argparse.Action):
    """-V/--version: the first line reads as qemu-nbd's, for tools that parse it."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"qemu-nbd {QEMU_NBD_VERSION} (qcow2fast {__version__})\n"
              f"qcow2fast serve: an NBD server with the options of qemu-nbd "
              f"{QEMU_NBD_VERSION}")
        raise SystemExit(0)


class _Checked(argparse.Action):
    """An option qemu-nbd checks as it reads it: ``check(value, namespace)``
    gives the value stored or raises qemu-nbd's error, in the order the
    options were given."""

    def __init__(self, *args, check, **kw):
        super().__init__(*args, **kw)
        self.check = check

    def __call__(self, parser, namespace, values, option_string=None):
        if values == []:    # argparse drops the value "--" (``--cache=--``); getopt keeps it
            values = "--"
        setattr(namespace, self.dest, self.check(values, namespace))


def _checked(p, *names, check, **kw):
    p.add_argument(*names, action=_Checked, check=check, **kw)


def _once(ns, what, message):
    if what in ns.seen:
        raise UsageError(message)
    ns.seen = ns.seen | {what}


def _nocache(_, ns):
    return _cache("none", ns)


def _cache(mode, ns):
    _once(ns, "cache", "-n and --cache can only be specified once")
    from ..engine.image import CACHE_MODES
    mode = CACHE_ALIASES.get(mode, mode)
    if mode not in CACHE_MODES:
        raise UsageError(f"Invalid cache mode `{mode}'")
    return mode


def _aio(mode, ns):
    _once(ns, "aio", "--aio can only be specified once")
    if mode not in AIO_MODES:
        raise UsageError(f"Invalid aio mode '{mode}'")
    return mode


def _discard(mode, ns):
    from ..nbd.export import DISCARD_MODES
    _once(ns, "discard", "--discard can only be specified once")
    if mode not in DISCARD_MODES:
        raise UsageError(f"Invalid discard mode `{mode}'")
    return mode


def _detect_zeroes(mode, ns):
    from ..nbd.export import DETECT_ZEROES_MODES, DISCARD_MODES
    if mode not in DETECT_ZEROES_MODES:
        raise UsageError(f"Failed to parse detect_zeroes mode: invalid parameter value: {mode}")
    if mode == "unmap" and DISCARD_MODES[ns.discard] != "unmap":   # (--discard given before)
        raise UsageError("setting detect-zeroes to unmap is not allowed without setting "
                         "discard operation to unmap")
    return mode


def _offset(text, ns):
    try:
        return strtou64(text)
    except (ValueError, OverflowError):
        raise UsageError(f"Invalid offset '{text}'") from None


def _shared(text, ns):
    try:
        return strtou64(text, 0, 2 ** 31 - 1)        # qemu_strtoi, and not negative
    except (ValueError, OverflowError):
        raise UsageError(f"Invalid shared device number '{text}'") from None


def _socket_path(path, ns):
    if not path.startswith("/"):
        raise UsageError("socket path must be absolute")
    return path


def _bounded(what):
    def check(text, ns):
        if len(text.encode()) > NBD_MAX_STRING_SIZE:
            raise UsageError(f"{what} '{text}' too long")
        return text
    return check


def _load_snapshot(text, ns):
    """-l: an internal snapshot (an id or name, or snapshot.id=,snapshot.name=),
    served read-only."""
    from .options import prog, split_options
    for key, _ in split_options(text) if text.startswith("snapshot.") else ():
        if key not in ("snapshot.id", "snapshot.name"):
            raise UsageError(f"Invalid parameter '{key}'\n"
                             f"{prog()}: Failed in parsing snapshot param `{text}'")
    ns.read_only = True
    return text


def _trace(text, ns):
    """-T: qemu's trace events.  qcow2fast has none: ``help`` lists none,
    a pattern matches none, and a name gets qemu's warning."""
    if text == "help":
        raise SystemExit(0)
    from .options import split_options, warn
    items = split_options(text)
    if items and items[0][1] is None:
        items[0] = ("enable", items[0][0])
    for key, value in items:
        if key not in ("enable", "events", "file"):
            raise UsageError(f"Invalid parameter '{key}'")
        if key == "enable" and not any(c in value for c in "*?"):
            warn(f"trace event '{value}' does not exist")
    return text


def check_options(args):
    """qemu-nbd's checks of the whole command line after its options were
    read, in its order and words; returns the Server's keyword arguments
    (besides the image)."""
    usage = QemuNbdWords.usage
    names = args.filenames
    if args.list:
        if names:
            raise UsageError("List mode is incompatible with a file name")
        if args.export_name or args.description or args.offset or args.device or \
                args.disconnect or args.fmt or args.snapshot or args.bitmaps or \
                args.allocation_depth or args.seen:
            raise UsageError("List mode is incompatible with per-device settings")
        if args.fork:
            raise UsageError("List mode is incompatible with forking")
    elif len(names) != 1:
        raise usage("Invalid number of arguments")
    else:
        args.filename = names[0]
    if args.tls_creds is not None:
        if args.device:
            raise UsageError("TLS is not supported with a host device")
        if args.tls_authz and args.list:
            raise UsageError("TLS authorization is incompatible with export list")
        if args.tls_hostname and not args.list:
            raise UsageError("TLS hostname is only supported with export list")
    elif args.tls_authz:
        raise UsageError("--tls-authz is not permitted without --tls-creds")
    elif args.tls_hostname:
        raise UsageError("--tls-hostname is not permitted without --tls-creds")
    if args.selinux_label:
        raise UsageError("SELinux support not enabled in this binary")
    if args.device or args.disconnect:
        # (qemu-nbd's words when built without the kernel's NBD client)
        raise UsageError("Kernel /dev/nbdN support not available")
    if args.tls_creds is None and args.objects:
        from .objects import parse_object
        for text in args.objects:           # still checked, as qemu creates them
            parse_object(text)
    cache = args.cache_mode or "writeback"
    if args.aio == "native" and cache not in ("none", "directsync"):
        raise UsageError(f"Failed to blk_new_open '{args.filename}': aio=native was "
                         "specified, but it requires cache.direct=on, which was not "
                         "specified.")
    port = None
    if args.port is not None:
        port = _port(args.port, args.host)
    if args.socket_path is not None:        # qemu-nbd: -k wins over -b/-p
        args.host, port = None, None
    if args.offset >= 2 ** 63:              # (qemu's raw driver takes it as an int64)
        raise UsageError(SIZE_HELP.format(key="offset"))
    return dict(shared=args.shared, port=port, cache=cache, offset=args.offset or None)


def _port(text, host):
    try:
        return int(text, 10)
    except ValueError:
        raise UsageError(f"address resolution failed for {host or 'localhost'}:{text}: "
                         "Servname not supported for ai_socktype") from None


def open_export(args, cache, offset):
    """The image to serve: FILE, --image-opts or json:, at -l's snapshot,
    under -s's temporary overlay, through -o's window."""
    from .json_filename import is_json, open_json
    extra = {} if cache == "writeback" else {"cache_mode": cache}
    writable = not args.read_only and not args.temp_overlay
    if is_json(args.filename) and args.snapshot is None:
        if args.untrusted:
            raise UsageError("serve: a json: file name cannot be served with --untrusted")
        img = open_json(args.filename, writable=writable, fmt=args.fmt, **extra)
    else:
        if args.image_opts and args.fmt:
            raise UsageError("--image-opts and -f are mutually exclusive")
        img = open_image(args.filename, args.fmt, image_opts=args.image_opts,
                         writable=writable, snapshot=args.snapshot,
                         **share_options(args), **extra)
    if args.temp_overlay:
        img = temporary_overlay(args, img, extra)
    if offset is None:
        return img
    try:
        return RawWindow(img, offset)
    except BaseException:
        img.close()
        raise


def temporary_overlay(args, base, extra):
    """-s: a qcow2 overlay over ``base`` (closed here) in $TMPDIR or
    /var/tmp, as qemu's BDRV_O_SNAPSHOT makes one: the export's writes go
    there and are gone at exit.  The file is unlinked once open, so that
    not even a crash leaves it behind."""
    import tempfile
    from .. import create, open as open_qcow2
    if args.snapshot is not None:       # (as qemu: -l looks in the new overlay)
        base.close()
        raise UsageError("Failed to load snapshot: Can't find snapshot")
    if args.image_opts:
        base.close()
        raise UsageError("-s/--snapshot takes a file or json: name (not --image-opts)")
    from .json_filename import is_json
    name = args.filename if is_json(args.filename) else os.path.abspath(args.filename)
    size, fmt = base.size, getattr(base, "format", "qcow2")
    base.close()
    fd, path = tempfile.mkstemp(prefix="vl.", dir=os.environ.get("TMPDIR") or "/var/tmp")
    os.close(fd)
    try:
        create(path, size, backing_file=name, backing_format=fmt)
        return open_qcow2(path, "r" if args.read_only else "r+", **extra)
    finally:
        os.unlink(path)


def list_exports(args):
    """-L: the exports of the server at -k, or -b/-p, as qemu-nbd lists them."""
    from ..nbd.listing import list_exports as ask
    address = args.socket_path or (args.host or "0.0.0.0", _port(args.port or "10809",
                                                                 args.host))
    tls = hostname = None
    if args.tls_creds is not None:
        from .objects import tls_context
        tls = tls_context(args.objects, args.tls_creds, client=True)
        hostname = args.tls_hostname or (None if args.socket_path else args.host or "0.0.0.0")
    exports = ask(address, tls=tls, hostname=hostname)
    print(f"exports available: {len(exports)}")
    for export in exports:
        print("\n".join(export.lines()))
    return 0


def blk_new_open_error(name, e):
    """An image that does not open, as qemu-nbd says it: qemu-img's
    "Could not open 'NAME': " before the block layer's error is qemu-nbd's
    "Failed to blk_new_open 'NAME': "."""
    from . import describe
    text = describe(e)
    said = f"Could not open '{name}': "
    if not text.startswith(said):
        return e
    return UsageError(f"Failed to blk_new_open '{name}': {text[len(said):]}")


def run(args):
    opts = check_options(args)
    if args.list:
        return list_exports(args)
    from ..nbd import Server, socket_activation_sockets   # asyncio: only for this command
    logging.basicConfig(stream=sys.stderr, format="qcow2fast serve: %(message)s",
                        level=logging.INFO if args.verbose else logging.WARNING)
    activated = socket_activation_sockets()
    if activated and (args.socket_path or args.host or opts["port"] is not None):
        raise UsageError("serve: socket activation (LISTEN_FDS) excludes --socket/--bind/--port")
    ready = None
    if args.fork:
        from .daemon import fork
        ready = fork()                      # the parent exits in there
    tls = authz = None
    if args.tls_creds is not None:
        from .objects import tls_authz, tls_context
        tls = tls_context(args.objects, args.tls_creds)
        if args.tls_authz is not None:
            authz = tls_authz(args.objects, args.tls_authz)
    try:
        img = open_export(args, opts["cache"], opts["offset"])
    except (Qcow2Error, OSError) as e:
        raise blk_new_open_error(args.filename, e) from e
    try:
        server = Server(img, socket_path=args.socket_path, host=args.host, port=opts["port"],
                        sockets=activated, read_only=args.read_only,
                        export_name=args.export_name, description=args.description,
                        shared=opts["shared"], persistent=args.persistent, tls=tls,
                        tls_authz=authz,
                        allocation_depth=args.allocation_depth, bitmaps=args.bitmaps,
                        discard=args.discard, detect_zeroes=args.detect_zeroes)
        if args.pid_file:
            from .daemon import write_pid_file
            write_pid_file(args.pid_file)
        stop = lambda *_: threading.Thread(target=server.close, daemon=True).start()  # noqa
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        logging.getLogger("qcow2fast.nbd").info("serving %s on %s", args.filename,
                                                server.address)
        if ready is not None:
            ready()
        server.serve_forever()
    finally:
        img.close()
    return 0
