"""A small HTTP/1.1 file server with Range support, for remote-image tests
and benchmarks (the standard library's http.server serves no ranges).

Serves the files of one directory: HEAD (Content-Length, a strong ETag,
Accept-Ranges), GET of the whole file or of one ``bytes=a-b`` range (206,
Content-Range), ``If-Match`` (412 when the ETag differs), keep-alive.  It
counts requests (``server.counts``: HEAD, GET, range requests, body bytes,
and the most bodies sent at once; ``GET /_stats`` answers them as JSON
for a server in another process) and misbehaves on demand
(``server.misbehave(mode, times=None)``; ``times``: only the next N range
requests, then it behaves again):

- ``short``     a 206 whose body (and Content-Length) is shorter than asked
- ``no_range``  Range ignored: 200 and the whole file
- ``change``    the object changes (new ETag) before the request is served
- ``stall``     no answer for ``stall_seconds`` (a timeout on the client)
- ``drop``      the connection closed half-way through the body

and, for clients that must cope: ``GET``/``HEAD /_redirect/NAME`` answers
302 to ``/NAME``; ``server.head_allowed = False`` answers HEAD with 405
(as a URL signed for GET only does).

Run alone (benchmarks): ``python -m tests.helpers.http_server DIR`` prints
its port and serves until killed.
"""

import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class RangeServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root, host="127.0.0.1", port=0):
        super().__init__((host, port), _Handler)
        self.root = os.path.abspath(root)
        self.counts = {"HEAD": 0, "GET": 0, "range": 0, "bytes": 0, "in_flight": 0,
                       "max_in_flight": 0}
        self.version = 0
        self.mode, self.times, self.stall_seconds = None, None, 5.0
        self.head_allowed = True
        self.lock = threading.Lock()
        self._thread = None

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def misbehave(self, mode, times=None):
        with self.lock:
            self.mode, self.times = mode, times

    def reset_counts(self):
        with self.lock:
            for k in self.counts:
                self.counts[k] = 0

    def _take_mode(self):
        """The misbehaviour for this range request, if any."""
        with self.lock:
            mode = self.mode
            if mode is not None and self.times is not None:
                self.times -= 1
                if self.times <= 0:
                    self.mode, self.times = None, None
            return mode

    def handle_error(self, request, client_address):
        pass        # a client that went away (drop, stall) is no news here

    def etag(self, st):
        return f'"{st.st_size:x}-{st.st_mtime_ns:x}-{self.version}"'


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _redirected(self):
        """Answer /_redirect/NAME with a redirect to /NAME."""
        if not self.path.startswith("/_redirect/"):
            return False
        self.send_response(302)
        self.send_header("Location", self.path[len("/_redirect"):])
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def _file(self):
        path = os.path.normpath(os.path.join(self.server.root, self.path.split("?")[0].lstrip("/")))
        if not path.startswith(self.server.root) or not os.path.isfile(path):
            self.send_error(404)
            return None, None
        return path, os.stat(path)

    def _count(self, key, n=1):
        with self.server.lock:
            self.server.counts[key] += n

    def do_HEAD(self):
        self._count("HEAD")
        if self._redirected():
            return
        if not self.server.head_allowed:
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, st = self._file()
        if path is None:
            return
        self.send_response(200)
        self._headers(st, st.st_size)
        self.end_headers()

    def _headers(self, st, length):
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", self.server.etag(st))

    def do_GET(self):
        if self.path == "/_stats":
            body = json.dumps(self.server.counts).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self._count("GET")
        if self._redirected():
            return
        path, st = self._file()
        if path is None:
            return
        m = _RANGE.match(self.headers.get("Range", ""))
        mode = None
        if m:
            self._count("range")
            mode = self.server._take_mode()
        if mode == "change":
            with self.server.lock:
                self.server.version += 1
        if mode == "stall":
            time.sleep(self.server.stall_seconds)
        want = self.headers.get("If-Match")
        if want is not None and want != "*" and want != self.server.etag(st):
            self.send_response(412)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, st.st_size
        if m and mode != "no_range":
            start = int(m.group(1))
            end = min(st.st_size, int(m.group(2)) + 1) if m.group(2) else st.st_size
            if start >= st.st_size or end <= start:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{st.st_size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{st.st_size}")
        else:
            self.send_response(200)
        length = end - start
        if mode == "short":
            length = max(0, length // 2)
        self._headers(st, length)
        self.end_headers()
        self.wfile.flush()
        if mode == "drop":
            length //= 2
        self._count("bytes", length)
        with self.server.lock:
            c = self.server.counts
            c["in_flight"] += 1
            c["max_in_flight"] = max(c["max_in_flight"], c["in_flight"])
        try:
            with open(path, "rb") as f:
                sent = 0
                while sent < length:
                    n = os.sendfile(self.connection.fileno(), f.fileno(), start + sent,
                                    length - sent)
                    if n <= 0:
                        break
                    sent += n
        finally:
            self._count("in_flight", -1)
        if mode == "drop":
            self.close_connection = True
            self.connection.shutdown(2)


def main(argv):
    server = RangeServer(argv[0], port=int(argv[1]) if len(argv) > 1 else 0)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
