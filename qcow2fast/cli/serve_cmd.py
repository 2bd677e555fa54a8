"""qcow2fast serve [OPTIONS] FILE -- qemu-nbd's server options and meaning:

  -k/--socket PATH, -b/--bind ADDR (default localhost), -p/--port N (10809)
  -e/--shared N (clients at once, default 1, 0 no limit), -t/--persistent
  -r/--read-only, -x/--export-name NAME, -D/--description TEXT
  -o/--offset N, -A/--allocation-depth, -B/--bitmap NAME (repeatable)
  -f/--format FMT, --image-opts, FILE or json:{...} (cli/json_filename.py)
  --cache MODE, -n/--nocache, --aio MODE, --discard MODE, --detect-zeroes MODE
  --object tls-creds-x509,id=ID,dir=DIR,endpoint=server --tls-creds ID
  --fork, --pid-file PATH, -v/--verbose, -V/--version

Served on a Unix socket, on TCP, or on the socket passed by systemd-style
socket activation (LISTEN_FDS, e.g. ``nbdinfo -- [ qcow2fast serve disk ]``).
As qemu-nbd: the server exits when its last client disconnects unless
``--persistent``; with ``-k`` the ``-b``/``-p`` options are ignored;
``--discard`` defaults to ``ignore`` (TRIM does nothing); multi-conn is
advertised unless ``--shared`` is 1.  SIGTERM and SIGINT stop it cleanly
(the image is flushed and closed).  One deliberate difference: ``-b``
defaults to localhost, not every interface."""

import argparse
import logging
import signal
import sys
import threading

from .. import __version__
from ..host.window import RawWindow
from .common import add_image_arguments, open_image, share_options
from .options import UsageError

QEMU_NBD_VERSION = "7.2.0"          # the qemu-nbd whose options and behaviour serve follows
AIO_MODES = ("threads", "native", "io_uring")      # accepted; requests run on threads


def add_parser(sub):
    p = sub.add_parser("serve", help="serve an image over NBD (qemu-nbd's options)")
    add_image_arguments(p)
    p.add_argument("--format", dest="fmt")
    p.add_argument("-V", "--version", action=_Version, nargs=0)
    p.add_argument("--socket", "-k", dest="socket_path", metavar="PATH")
    p.add_argument("--bind", "-b", dest="host", metavar="HOST")
    p.add_argument("--port", "-p", dest="port", metavar="N")
    p.add_argument("--read-only", "-r", dest="read_only", action="store_true")
    p.add_argument("--export-name", "-x", dest="export_name", default="", metavar="NAME")
    p.add_argument("--description", "-D", dest="description", metavar="TEXT")
    p.add_argument("--shared", "-e", dest="shared", default="1", metavar="N",
                   help="serve at most N clients at once (default 1, 0: no limit)")
    p.add_argument("--persistent", "-t", dest="persistent", action="store_true",
                   help="keep serving after the last client disconnects")
    p.add_argument("--offset", "-o", dest="offset", metavar="OFFSET")
    p.add_argument("--allocation-depth", "-A", dest="allocation_depth", action="store_true")
    p.add_argument("--bitmap", "-B", dest="bitmaps", action="append", default=[],
                   metavar="NAME")
    p.add_argument("--cache", dest="cache_mode", metavar="MODE")
    p.add_argument("--nocache", "-n", dest="nocache", action="store_true")
    p.add_argument("--aio", dest="aio", metavar="MODE")
    p.add_argument("--discard", dest="discard", default="ignore", metavar="MODE")
    p.add_argument("--detect-zeroes", dest="detect_zeroes", default="off", metavar="MODE")
    p.add_argument("--tls-creds", dest="tls_creds", metavar="ID")
    p.add_argument("--tls-authz", dest="tls_authz", metavar="ID")
    p.add_argument("--fork", dest="fork", action="store_true")
    p.add_argument("--pid-file", dest="pid_file", metavar="PATH")
    p.add_argument("--verbose", "-v", dest="verbose", action="store_true")
    p.add_argument("filename")
    p.set_defaults(run=run)


class _Version(argparse.Action):
    """-V/--version: the first line reads as qemu-nbd's, for tools that parse it."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"qemu-nbd {QEMU_NBD_VERSION} (qcow2fast {__version__})\n"
              f"qcow2fast serve: an NBD server with the options of qemu-nbd "
              f"{QEMU_NBD_VERSION}")
        raise SystemExit(0)


def _int(text, message):
    try:
        value = int(text, 10)
    except (TypeError, ValueError):
        raise UsageError(message) from None
    if value < 0:
        raise UsageError(message)
    return value


def check_options(args):
    """qemu-nbd's checks of the command line, with its messages; returns
    the keyword arguments for the Server (besides the image)."""
    from ..engine.image import CACHE_MODES
    from ..nbd.export import DETECT_ZEROES_MODES, DISCARD_MODES
    shared = _int(args.shared, f"Invalid shared device number '{args.shared}'")
    if args.nocache:
        if args.cache_mode is not None:
            raise UsageError("-n and --cache can only be specified once")
        args.cache_mode = "none"
    cache = args.cache_mode or "writeback"
    if cache not in CACHE_MODES:
        raise UsageError(f"Invalid cache mode `{cache}'")
    if args.aio is not None and args.aio not in AIO_MODES:
        raise UsageError(f"Invalid aio mode '{args.aio}'")
    if args.aio == "native" and cache not in ("none", "directsync"):
        raise UsageError(f"Failed to blk_new_open '{args.filename}': aio=native was "
                         "specified, but it requires cache.direct=on, which was not "
                         "specified.")
    if args.discard not in DISCARD_MODES:
        raise UsageError(f"Invalid discard mode `{args.discard}'")
    if args.detect_zeroes not in DETECT_ZEROES_MODES:
        raise UsageError("Failed to parse detect_zeroes mode: invalid parameter value: "
                         f"{args.detect_zeroes}")
    if args.detect_zeroes == "unmap" and DISCARD_MODES[args.discard] != "unmap":
        raise UsageError("setting detect-zeroes to unmap is not allowed without setting "
                         "discard operation to unmap")
    if args.tls_authz is not None:
        raise UsageError("--tls-authz is not supported by qcow2fast serve")
    if args.tls_creds is None and args.objects:
        from .objects import parse_object
        for text in args.objects:           # still checked, as qemu creates them
            parse_object(text)
    port = None
    if args.port is not None:
        port = _int(args.port, f"address resolution failed for {args.host or 'localhost'}:"
                    f"{args.port}: Servname not supported for ai_socktype")
    if args.socket_path is not None:        # qemu-nbd: -k wins over -b/-p
        args.host, port = None, None
    offset = None if args.offset is None else _int(args.offset,
                                                   f"Invalid offset '{args.offset}'")
    return dict(shared=shared, port=port, cache=cache, offset=offset)


def open_export(args, cache, offset):
    """The image to serve: FILE, --image-opts or json:, with -o's window."""
    from .json_filename import is_json, open_json
    extra = {} if cache == "writeback" else {"cache_mode": cache}
    if is_json(args.filename):
        if args.untrusted:
            raise UsageError("serve: a json: file name cannot be served with --untrusted")
        img = open_json(args.filename, writable=not args.read_only, fmt=args.fmt, **extra)
    else:
        img = open_image(args.filename, args.fmt, image_opts=args.image_opts,
                         writable=not args.read_only, **share_options(args), **extra)
    if offset is None:
        return img
    try:
        return RawWindow(img, offset)
    except BaseException:
        img.close()
        raise


def run(args):
    opts = check_options(args)
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
    tls = None
    if args.tls_creds is not None:
        from .objects import tls_context
        tls = tls_context(args.objects, args.tls_creds)
    img = open_export(args, opts["cache"], opts["offset"])
    try:
        server = Server(img, socket_path=args.socket_path, host=args.host, port=opts["port"],
                        sockets=activated, read_only=args.read_only,
                        export_name=args.export_name, description=args.description,
                        shared=opts["shared"], persistent=args.persistent, tls=tls,
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
