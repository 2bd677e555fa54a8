"""The listener: Unix or TCP sockets, or one inherited through systemd
socket activation (``LISTEN_FDS``), a worker thread per connection (kept
for the next one a while: a connection's set-up is most of a short one's
cost), and a clean stop.

Why threads: the image releases the GIL for reads and overwrites, so a
thread per connection doing blocking socket I/O costs a couple of system
calls and a few microseconds of Python per request (less with pipelining,
see channel.py); an asyncio loop costs several times that per request.
Asyncio programs use the same server through ``start()``/``aclose()``
(or ``async with``), which do the blocking parts in a worker thread.
"""

import asyncio
import logging
import os
import queue
import selectors
import socket
import stat
import threading
import time

from .channel import Channel, Disconnected
from .export import Export, open_export_image
from .handshake import ProtocolError, negotiate
from .transmission import Transmission

log = logging.getLogger("qcow2fast.nbd")

DEFAULT_PORT = 10809
SD_LISTEN_FDS_START = 3
IDLE_SECONDS = 10.0                     # a worker thread without a connection exits after
UNLIMITED = 1 << 30     # "shared=0": a semaphore that never blocks
STOP_GRACE = 5.0        # seconds connections get to finish their request on stop


def socket_activation_sockets():
    """The listening sockets passed by systemd-style socket activation
    (``LISTEN_PID`` is this process, ``LISTEN_FDS`` how many, from fd 3),
    or [] when there are none.  The variables are removed so children do
    not inherit them."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if not pid or not count or pid.strip() != str(os.getpid()):
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


class Server:
    """An NBD server for one image.

    ``image`` is an open image (``qcow2fast.open`` / ``RawImage``; the caller
    keeps ownership) or a path (opened here, format probed unless ``fmt``,
    ``open_options`` passed to ``qcow2fast.open``, closed on ``close()``).
    Listen on ``socket_path`` (Unix), or ``host``/``port`` (TCP; port 0
    picks a free one, see ``address``), or the already listening
    ``sockets`` (e.g. ``socket_activation_sockets()``).  At most ``shared``
    clients are served at once (0: any number); more wait in the listen
    backlog; NBD_FLAG_CAN_MULTI_CONN is advertised unless ``shared`` is 1,
    as qemu-nbd does.  Unless ``persistent``, the server stops when its
    last client has gone.  ``tls`` (an ``ssl.SSLContext``, see nbd/tls.py)
    requires TLS of every client; ``tls_authz`` (nbd/authz.py) says whose
    certificates may connect.  ``allocation_depth``, ``bitmaps``,
    ``discard`` and ``detect_zeroes`` are qemu-nbd's ``-A``, ``-B``,
    ``--discard`` and ``--detect-zeroes`` (see :class:`Export`).
    """

    def __init__(self, image, *, socket_path=None, host=None, port=None, sockets=None,
                 read_only=None, export_name="", description=None, shared=16,
                 persistent=True, fmt=None, open_options=None, tls=None, tls_authz=None,
                 allocation_depth=True, bitmaps=(), discard="unmap", detect_zeroes="off"):
        if shared < 0:
            raise ValueError("shared must be 0 (no limit) or more")
        self._owns_image = isinstance(image, (str, os.PathLike))
        if self._owns_image:
            image = open_export_image(os.fspath(image), read_only=bool(read_only), fmt=fmt,
                                      **(open_options or {}))
        try:
            self.export = Export(image, export_name, description, read_only,
                                 allocation_depth=allocation_depth, bitmaps=bitmaps,
                                 multi_conn=shared != 1, discard=discard,
                                 detect_zeroes=detect_zeroes)
        except BaseException:
            self._release_image(image)
            raise
        self.tls, self.tls_authz = tls, tls_authz
        self.socket_path = socket_path
        self.persistent = persistent
        self._slots = threading.Semaphore(shared or UNLIMITED)
        self._lock = threading.Lock()
        self._clients = set()               # the Channels of connections being served
        self._workers = set()               # worker threads, serving or idle
        self._idle = 0
        self._handoff = queue.SimpleQueue()  # (Channel, peer) for an idle worker
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._acceptor = None
        self._wake_r, self._wake_w = socket.socketpair()
        try:
            self._listeners = list(sockets) if sockets else [self._listen(socket_path, host,
                                                                          port)]
        except BaseException:
            self._release_image(self.export.image)
            raise

    # -- setting up -----------------------------------------------------------------------

    @staticmethod
    def _listen(socket_path, host, port):
        if socket_path is not None:
            if host is not None or port is not None:
                raise ValueError("give either a socket path or a host/port, not both")
            try:
                if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
                    os.unlink(socket_path)          # a stale socket of an earlier run
            except FileNotFoundError:
                pass
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.bind(socket_path)
            except BaseException:
                s.close()
                raise
        else:
            s = socket.create_server((host or "localhost", DEFAULT_PORT if port is None
                                      else port), reuse_port=False)
        s.listen(64)
        return s

    @property
    def address(self):
        """Where the (first) listening socket is bound: a path or (host, port)."""
        return self._listeners[0].getsockname()

    def start(self):
        """Start accepting connections in a background thread; returns self."""
        if self._stopping.is_set():
            raise ValueError("the server has been closed")
        if self._acceptor is None:
            self._acceptor = threading.Thread(target=self._accept_loop, name="nbd-accept",
                                              daemon=True)
            self._acceptor.start()
        return self

    def serve_forever(self):
        """Start if needed, and block until the server has stopped."""
        if not self._stopping.is_set():
            self.start()
        while not self._stopped.wait(1.0):
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- asyncio ----------------------------------------------------------------------------

    async def __aenter__(self):
        return self.start()

    async def __aexit__(self, *exc):
        await self.aclose()

    async def aclose(self):
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    async def wait_closed(self):
        await asyncio.get_running_loop().run_in_executor(None, self._stopped.wait)

    # -- accepting and serving ------------------------------------------------------------------

    def _accept_loop(self):
        sel = selectors.DefaultSelector()
        try:
            for s in self._listeners:
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                self._slots.acquire()           # wait for a free slot (--shared)
                if self._stopping.is_set():
                    self._slots.release()
                    break
                conn = None
                while conn is None and not self._stopping.is_set():
                    for key, _ in sel.select():
                        if key.fileobj is self._wake_r:
                            break
                        try:
                            conn, peer = key.fileobj.accept()
                            break
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError as e:      # EMFILE, ENOBUFS...: keep listening
                            log.warning("nbd: accept failed: %s", e)
                            self._stopping.wait(0.1)
                if conn is None:
                    self._slots.release()
                    break
                self._spawn(conn, peer)
        except Exception:
            log.exception("nbd: the listener failed")
        finally:
            sel.close()

    # A connection is served by a worker thread; one whose connection ended
    # waits IDLE_SECONDS for the next (a new thread costs about 50 us of a
    # short connection's set-up).  Under ``_lock``: ``_idle`` (waiting
    # workers) and every hand-over through ``_handoff``, so a worker giving
    # up never misses a connection handed to it.

    def _spawn(self, conn, peer):
        conn.setblocking(True)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        chan, peer = Channel(conn), peer or "unix"
        with self._lock:
            self._clients.add(chan)
            if self._idle:
                self._idle -= 1
                self._handoff.put((chan, peer))
                return
            t = threading.Thread(target=self._worker, args=(chan, peer), name="nbd-client",
                                 daemon=True)
            self._workers.add(t)
        t.start()

    def _worker(self, chan, peer):
        me = threading.current_thread()
        while True:
            self._serve_client(chan, peer)
            with self._lock:
                if self._stopping.is_set():
                    self._workers.discard(me)
                    return
                self._idle += 1
            try:
                item = self._handoff.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    try:
                        item = self._handoff.get_nowait()    # handed over meanwhile
                    except queue.Empty:
                        self._idle -= 1
                        item = None
            if item is None:                    # (None: close() stops idle workers)
                with self._lock:
                    self._workers.discard(me)
                return
            chan, peer = item

    def _serve_client(self, chan, peer):
        try:
            session = negotiate(chan, self.export, self.tls, self.tls_authz)
            if session is not None:
                Transmission(chan, self.export, session, str(peer)).run()
                chan.flush()
        except (Disconnected, BrokenPipeError, ConnectionResetError):
            pass                                # the client went away: nothing to report
        except ProtocolError as e:
            log.warning("nbd: %s: dropping the connection: %s", peer, e)
        except OSError as e:
            if not self._stopping.is_set():
                log.warning("nbd: %s: %s", peer, e)
        except Exception:
            log.exception("nbd: %s: unexpected error, connection dropped", peer)
        finally:
            try:
                chan.sock.close()               # the TLS socket, after STARTTLS
                chan.release()
            finally:
                with self._lock:
                    self._clients.discard(chan)
                    last = not self._clients
                self._slots.release()
                if last and not self.persistent:
                    self._request_stop()

    def _request_stop(self):
        # From a client thread: close() joins threads, so run it on its own.
        self._stopping.set()
        threading.Thread(target=self.close, daemon=True).start()

    # -- stopping -----------------------------------------------------------------------------------

    def close(self):
        """Stop accepting, let each connection finish the request it is
        serving, drop the connections, close the listening sockets (and the
        image, when the server opened it).  Safe to call more than once and
        from any thread."""
        with self._lock:
            if self._stopped.is_set() or getattr(self, "_closing", False):
                return
            self._closing = True
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._slots.release()                   # wake an acceptor waiting for a slot
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            self._acceptor.join()
        with self._lock:
            clients = set(self._clients)
            workers = self._workers - {threading.current_thread()}
            for _ in range(self._idle):          # the idle workers: stop
                self._handoff.put(None)
            self._idle = 0
        for chan in clients:
            _shutdown(chan.sock, socket.SHUT_RD)     # the next read sees end of file
        deadline = time.monotonic() + STOP_GRACE    # one grace for all, not one each
        for t in workers:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            stuck = set(self._clients)           # sending to a client that reads nothing
        for chan in stuck:
            _shutdown(chan.sock, socket.SHUT_RDWR)
        for t in workers:
            t.join()
        for s in self._listeners:
            s.close()
        if self.socket_path is not None:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        self._wake_r.close()
        self._wake_w.close()
        self._release_image(self.export.image)
        self._stopped.set()

    def _release_image(self, image):
        if self._owns_image:
            image.close()


def _shutdown(conn, how):
    try:
        conn.shutdown(how)
    except OSError:
        pass


def serve(image, **options):
    """Serve ``image`` over NBD in background threads and return the started
    :class:`Server` (see its options).  ``server.close()`` (or ``await
    server.aclose()``) stops it; ``server.serve_forever()`` (or ``await
    server.wait_closed()``) waits until it stops.  Usable as a context
    manager, sync or async."""
    return Server(image, **options).start()


