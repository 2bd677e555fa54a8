"""NBD serving: ``qcow2fast serve`` versus ``qemu-nbd`` on the same
page-cached qcow2 image, in one run, with real clients.

    python -m benchmarks.nbd_bench [--quick] [--runs N] [--size SIZE] [--json OUT] [--plot PNG]

Scenarios (every request 4 KiB, reads only):

``nbdcopy cN``  ``nbdcopy --request-size=4096 --connections=N URI null:``
                (N = 1, 2, 4 and 8): the whole image, 4 KiB requests, nbdcopy's
                default 64 requests in flight per connection.  Wall time of
                the nbdcopy process (including its connect).
``bench dD``    ``qemu-img bench -f raw -c COUNT -d D -s 4k -S 4k URI``
                (D = 1 and 16): sequential 4 KiB reads through qemu's NBD
                client, queue depth D; qemu's own "Run completed" time.

The two servers, both over a Unix socket, read-only, shared by up to 8
clients, with the host page cache (the image is written, then read once
so that it is cached, before any sample):

    python -m qcow2fast serve -t -r -e 8 --cache writeback --socket S IMAGE
    qemu-nbd -t -r -e 8 --cache=writeback --aio=io_uring -f qcow2 --socket S IMAGE

(``--aio=threads`` if io_uring does not work here.)  The image is fully
allocated (64 KiB clusters, written by qemu-io), so every request reads
data and nbdcopy cannot skip holes.  Each configuration runs ``--runs``
times (3 with --quick, else 5), the servers in alternating order; the
tables show medians, spread and the ratio of request rates (>1 = qcow2fast
faster).  Both servers are checked afterwards (``qemu-img compare`` of the
export against the image).  Clients and servers share the machine's CPUs,
unpinned: on a 2-CPU VM this is a client/server ping-pong on two cores.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

from .common import (ROOT, GiB, MiB, BenchError, choose_tmpdir, git_revision, human, log,
                     parse_size, ratio_info, run, summarise)
from .io_setup import warm_page_cache
from .io_config import RUN_RE
from .report import bar_groups, fmt_ratio, panels, rates, save_figure

REQ = 4096
CONNECTIONS = (1, 2, 4, 8)
SERVERS = ("qcow2fast", "qemu-nbd")
REPO = ROOT        # children import qcow2fast from where this one did


class Servers:
    """Starts and stops the two servers on Unix sockets in ``tmpdir``."""

    def __init__(self, image, tmpdir):
        self.image, self.tmpdir = image, tmpdir
        self.procs = {}
        self.aio = "io_uring"

    def command(self, name, sock):
        if name == "qcow2fast":
            return [sys.executable, "-m", "qcow2fast", "serve", "-t", "-r", "-e", "8",
                    "--cache", "writeback", "--socket", sock, self.image]
        return ["qemu-nbd", "-t", "-r", "-e", "8", "--cache=writeback", f"--aio={self.aio}",
                "-f", "qcow2", "--socket", sock, self.image]

    def start(self, name):
        sock = os.path.join(self.tmpdir, f"{name}.sock")
        p = subprocess.Popen(self.command(name, sock), stderr=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=REPO))
        if not _wait_connectable(sock, p):
            err = p.stderr.read().decode()
            if name == "qemu-nbd" and self.aio == "io_uring":
                log("  qemu-nbd --aio=io_uring failed here; using --aio=threads")
                self.aio = "threads"
                return self.start(name)
            raise BenchError(f"{name} did not start: {err}")
        self.procs[name] = p
        return f"nbd+unix:///?socket={sock}"

    def stop(self):
        for name, p in self.procs.items():
            p.terminate()
            if p.wait(timeout=60) not in (0, -15):
                log(f"  {name} exited {p.returncode}: {p.stderr.read().decode()[-500:]}")


def _wait_connectable(sock, proc):
    for _ in range(300):
        if proc.poll() is not None:
            return False
        if os.path.exists(sock):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(sock)
                return True
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.1)
    return False


def nbdcopy(uri, connections):
    t0 = time.perf_counter()
    run(["nbdcopy", f"--request-size={REQ}", f"--connections={connections}", uri, "null:"])
    return time.perf_counter() - t0


def qemu_bench(uri, count, depth):
    p = run(["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", str(depth),
             "-s", str(REQ), "-S", str(REQ), uri])
    m = RUN_RE.search(p.stdout)
    if not m:
        raise BenchError(f"unexpected qemu-img bench output:\n{p.stdout}{p.stderr}")
    return float(m[1])


def scenarios(a):
    count = a.count
    return [
        *((f"nbdcopy c{n}", a.size // REQ, lambda uri, n=n: nbdcopy(uri, n))
          for n in CONNECTIONS),
        ("bench d1", count, lambda uri: qemu_bench(uri, count, 1)),
        ("bench d16", count, lambda uri: qemu_bench(uri, count, 16)),
    ]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.nbd_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="256 MiB image, 3 runs")
    p.add_argument("--runs", type=int)
    p.add_argument("--size", type=parse_size, help="image size (default 1G, --quick 256M)")
    p.add_argument("--count", type=int, help="qemu-img bench requests (default size/4K/2)")
    p.add_argument("--tmpdir")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--plot", metavar="PNG", help="write the plot here")
    a = p.parse_args(argv)
    a.runs = a.runs or (3 if a.quick else 5)
    a.size = a.size or ((256 * MiB) if a.quick else GiB)
    a.count = a.count or a.size // REQ // 2
    return a


def main(argv=None):
    a = parse_args(argv)
    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "nbdcopy"):
        if not shutil.which(tool):
            log(f"nbd_bench: {tool} not found (Debian packages qemu-utils, libnbd-bin)")
            return 1
    tmpdir, fstype = choose_tmpdir(a.tmpdir, a.size + 64 * MiB)
    image = os.path.join(tmpdir, "served.qcow2")
    servers = Servers(image, tmpdir)
    results = {}
    try:
        log(f"nbd_bench: writing a {human(a.size)} image in {tmpdir} ({fstype})")
        run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(a.size)])
        run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {a.size}", image])
        warm_page_cache(image)
        uris = {name: servers.start(name) for name in SERVERS}
        for label, nreq, fn in scenarios(a):
            samples = {name: [] for name in SERVERS}
            for r in range(a.runs):
                for name in (SERVERS if r % 2 == 0 else SERVERS[::-1]):
                    samples[name].append(fn(uris[name]))
            results[label] = {"requests": nreq, "samples": samples}
            log(f"  {label}: " + ", ".join(f"{n} {min(s):.3f}-{max(s):.3f} s"
                                             for n, s in samples.items()))
        for name, uri in uris.items():
            p = run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, image], check=False)
            if p.returncode != 0:
                raise BenchError(f"{name}: the export differs from the image:\n{p.stdout}"
                                 f"{p.stderr}")
        log("  verified: qemu-img compare of each export against the image")
    except BenchError as e:
        log(f"nbd_bench: {e}")
        return 1
    finally:
        servers.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)
    print_report(a, servers.aio, results)
    if a.plot:
        plot(a, servers.aio, results, a.plot)
    if a.json:
        write_json(a, servers, results)
    return 0


def print_report(a, aio, results):
    print(f"\nnbd_bench: {human(a.size)} qcow2 image (64K clusters, fully allocated, "
          f"page-cached), 4 KiB reads over a Unix socket, {a.runs} runs each; qemu-nbd "
          f"--aio={aio} --cache=writeback, qcow2fast serve --cache writeback; "
          f"{os.cpu_count()} CPUs")
    head = (f"{'scenario':<12} {'server':<10} {'median s':>8} {'min s':>7} {'max s':>7} "
            f"{'kreq/s':>7} {'MiB/s':>7}  qcow2fast vs qemu-nbd")
    print(head)
    print("-" * len(head))
    for label, r in results.items():
        s = r["samples"]
        ratio = ratio_info(s["qemu-nbd"], s["qcow2fast"])
        for i, name in enumerate(SERVERS):
            st = summarise(s[name])
            rate = r["requests"] / st["median"]
            print(f"{label if i == 0 else '':<12} {name:<10} {st['median']:8.3f} "
                  f"{st['min']:7.3f} {st['max']:7.3f} {rate / 1000:7.1f} "
                  f"{rate * REQ / MiB:7.1f}  {fmt_ratio(ratio) if i == 0 else ''}")
    print("ratio: request rate of qcow2fast / qemu-nbd (median times), per-run range "
          "in brackets; >1 = qcow2fast faster")
    conn = [results[f"nbdcopy c{n}"] for n in CONNECTIONS if f"nbdcopy c{n}" in results]
    for name in SERVERS:
        rates = [r["requests"] / summarise(r["samples"][name])["median"] for r in conn]
        worse = [f"c{CONNECTIONS[i + 1]}" for i in range(len(rates) - 1)
                 if rates[i + 1] < rates[i]]
        print(f"{name}: request rate with more connections "
              + ("never lower" if not worse else f"lower at {', '.join(worse)}")
              + f" (load average {os.getloadavg()[0]:.1f})")


def plot(a, aio, results, path):
    """Per scenario and server (median, min-max over the runs): nbdcopy's
    throughput, qemu-img bench's request rate."""
    fig, axes = panels(2, 4.8, 4.2)
    for ax, prefix, unit, scale, title in (
            (axes[0], "nbdcopy", "throughput (MiB/s)", REQ / MiB,
             f"nbdcopy, 4 KiB requests, {a.size // MiB} MiB to null:"),
            (axes[1], "bench", "4 KiB reads / s", 1, "qemu-img bench, sequential 4 KiB reads")):
        rows = {k: r for k, r in results.items() if k.startswith(prefix)}
        series = [(label, [[x * scale for x in rates(r["requests"], r["samples"][name])]
                           for r in rows.values()])
                  for name, label in (("qcow2fast", "qcow2fast serve"),
                                      ("qemu-nbd", f"qemu-nbd --aio={aio}"))]
        groups = [k.replace("nbdcopy c", "connections ").replace("bench d", "queue depth ")
                  for k in rows]
        bar_groups(ax, groups, series, unit, title, log="auto")
    fig.suptitle(f"NBD over a Unix socket, read-only, page-cached qcow2 image, {a.runs} runs",
                 fontsize="medium")
    save_figure(fig, path, legend=axes[0])


def write_json(a, servers, results):
    rev, dirty = git_revision(REPO)
    doc = {"benchmark": "qcow2fast nbd_bench", "size": a.size, "runs": a.runs,
           "request_size": REQ, "qemu_nbd_aio": servers.aio,
           "commands": {n: servers.command(n, "SOCKET") for n in SERVERS},
           "git_revision": rev, "git_dirty": dirty, "cpu_count": os.cpu_count(),
           "scenarios": {k: dict(v, stats={n: summarise(s) for n, s in v["samples"].items()},
                                 ratio=ratio_info(v["samples"]["qemu-nbd"],
                                                  v["samples"]["qcow2fast"]))
                         for k, v in results.items()}}
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=2)
    log(f"  wrote {a.json}")


if __name__ == "__main__":
    sys.exit(main())
