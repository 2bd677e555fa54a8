"""qcow2fast serve [-f fmt] [--image-opts] [--socket PATH | --bind HOST --port N]
                 [--read-only] [--export-name NAME] [--description TEXT] [--shared N]
                 [--persistent] [--cache MODE] [-v] filename

Serve an image over NBD, as qemu-nbd does: on a Unix socket, on TCP
(default localhost:10809), or on the socket passed by systemd-style socket
activation (LISTEN_FDS, e.g. ``nbdinfo -- [ qcow2fast serve disk.qcow2 ]``).
Like qemu-nbd, the server exits when its last client disconnects unless
``--persistent``; SIGTERM and SIGINT stop it cleanly (the image is flushed
and closed).  No TLS."""

import logging
import signal
import sys
import threading

from ..engine.image import CACHE_MODES
from .common import add_image_arguments, open_image, share_options
from .options import UsageError


def add_parser(sub):
    p = sub.add_parser("serve", help="serve an image over NBD")
    add_image_arguments(p)
    p.add_argument("--socket", "-k", dest="socket_path", metavar="PATH")
    p.add_argument("--bind", "-b", dest="host", metavar="HOST")
    p.add_argument("--port", "-p", dest="port", type=int, metavar="N")
    p.add_argument("--read-only", "-r", dest="read_only", action="store_true")
    p.add_argument("--export-name", "-x", dest="export_name", default="", metavar="NAME")
    p.add_argument("--description", "-D", dest="description", metavar="TEXT")
    p.add_argument("--shared", "-e", dest="shared", type=int, default=16, metavar="N",
                   help="serve at most N clients at once (default 16)")
    p.add_argument("--persistent", "-t", dest="persistent", action="store_true",
                   help="keep serving after the last client disconnects")
    p.add_argument("--cache", dest="cache_mode", choices=CACHE_MODES, default="writeback")
    p.add_argument("--verbose", "-v", dest="verbose", action="store_true")
    p.add_argument("filename")
    p.set_defaults(run=run)


def run(args):
    from ..nbd import Server, socket_activation_sockets   # asyncio: only for this command
    logging.basicConfig(stream=sys.stderr, format="qcow2fast serve: %(message)s",
                        level=logging.INFO if args.verbose else logging.WARNING)
    if args.shared < 1:
        raise UsageError("serve: --shared must be at least 1")
    activated = socket_activation_sockets()
    if activated and (args.socket_path or args.host or args.port is not None):
        raise UsageError("serve: socket activation (LISTEN_FDS) excludes --socket/--bind/--port")
    if args.socket_path and (args.host or args.port is not None):
        raise UsageError("serve: give either --socket or --bind/--port")
    extra = {} if args.cache_mode == "writeback" else {"cache_mode": args.cache_mode}
    img = open_image(args.filename, args.fmt, image_opts=args.image_opts,
                     writable=not args.read_only, **share_options(args), **extra)
    try:
        server = Server(img, socket_path=args.socket_path, host=args.host, port=args.port,
                        sockets=activated, read_only=args.read_only,
                        export_name=args.export_name, description=args.description,
                        shared=args.shared, persistent=args.persistent)
        stop = lambda *_: threading.Thread(target=server.close, daemon=True).start()  # noqa
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        logging.getLogger("qcow2fast.nbd").info("serving %s on %s", args.filename,
                                                server.address)
        server.serve_forever()
    finally:
        img.close()
    return 0
