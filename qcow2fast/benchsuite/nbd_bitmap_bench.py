"""Serving a dirty bitmap: the time of ``nbdinfo --map=qemu:dirty-bitmap:b0``
against ``qcow2fast serve -B b0`` and ``qemu-nbd -B b0`` side by side, on a
sparse 1 TiB qcow2 image whose 64 KiB-granularity bitmap (qemu-img bitmap
--add) has ``--dirty`` scattered runs set by qemu-io writes.  Both servers
are started once (``-r -t`` on a Unix socket); only nbdinfo is timed,
alternating between them, medians over ``--runs``; the servers' CPU time
per run (all threads, from /proc: less disturbed by a loaded machine) is
shown beside.  The outputs must match.

    python -m benchmarks.nbd_bitmap_bench [--size 1T] [--dirty 2000] [--runs 5]
        [--server-cpus LIST] [--client-cpus LIST]

nbdinfo makes one request per 4 GiB (about 260 for 1 TiB), each waiting for
the reply before the next, so the figure is mostly the round trip, and on
a small VM that depends on where the scheduler puts the two processes: a
wake-up of an idle vCPU here costs 20-30 us, a switch on one CPU about 1.
``--server-cpus``/``--client-cpus`` (taskset lists) pin them to compare
like with like: on one CPU, or server and client on different CPUs.
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from .common import ROOT

REPO = ROOT        # children import qcow2fast from where this one did


def start(cmd, sock):
    p = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=REPO), stderr=subprocess.PIPE)
    for _ in range(600):
        if os.path.exists(sock) or p.poll() is not None:
            break
        time.sleep(0.1)
    if not os.path.exists(sock):
        raise SystemExit(f"{cmd[0]} did not start: {p.stderr.read().decode()}")
    return p


def cpu_seconds(pid):
    """CPU time of a process so far, all its threads (/proc/PID/task/*/schedstat:
    nanoseconds, where /proc/PID/stat counts 10 ms ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError):       # a thread that just ended
            pass
    return total / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1T")
    ap.add_argument("--dirty", type=int, default=2000, help="scattered writes")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--server-cpus", help="run both servers on these CPUs (taskset list)")
    ap.add_argument("--client-cpus", help="run nbdinfo on these CPUs (taskset list)")
    a = ap.parse_args(argv)
    on_server = ["taskset", "-c", a.server_cpus] if a.server_cpus else []
    on_client = ["taskset", "-c", a.client_cpus] if a.client_cpus else []
    tmp = tempfile.mkdtemp(prefix="nbd-bitmap-bench-")
    try:
        path = os.path.join(tmp, "big.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, a.size], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", path, "b0"], check=True)
        size = int(subprocess.run(["qemu-img", "info", "--output=json", path], check=True,
                                  capture_output=True, text=True).stdout.split(
            '"virtual-size": ')[1].split(",")[0])
        rng = random.Random(1)
        cmds = []
        for _ in range(a.dirty):
            off = rng.randrange(0, size - (1 << 20)) // 512 * 512
            cmds += ["-c", f"write -z {off} {rng.choice([4096, 65536, 300000])}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], check=True,
                       stdout=subprocess.DEVNULL)
        socks = {"qemu-nbd": os.path.join(tmp, "q.sock"), "qcow2fast": os.path.join(tmp, "o.sock")}
        procs = [start([*on_server, "qemu-nbd", "-r", "-t", "-f", "qcow2", "-B", "b0", "-k",
                        socks["qemu-nbd"], path], socks["qemu-nbd"]),
                 start([*on_server, sys.executable, "-m", "qcow2fast", "serve", "-r", "-t",
                        "-f", "qcow2", "-B", "b0", "-k", socks["qcow2fast"], path],
                       socks["qcow2fast"])]
        times = {k: [] for k in socks}
        pids = dict(zip(socks, (p.pid for p in procs)))
        cpu = {k: -cpu_seconds(pids[k]) for k in socks}
        outs = {}
        try:
            for _ in range(a.runs):
                for name, sock in socks.items():
                    t0 = time.perf_counter()
                    out = subprocess.run([*on_client, "nbdinfo", "--map=qemu:dirty-bitmap:b0",
                                          f"nbd+unix:///?socket={sock}"], check=True,
                                         capture_output=True, text=True).stdout
                    times[name].append(time.perf_counter() - t0)
                    outs[name] = out
            for name in socks:
                cpu[name] += cpu_seconds(pids[name])
        finally:
            for p in procs:
                p.terminate()
                p.wait()
        same = outs["qemu-nbd"] == outs["qcow2fast"]
        print(f"image {a.size}, {a.dirty} scattered writes, "
              f"{outs['qcow2fast'].count('dirty')} dirty extents; outputs identical: {same}")
        for name, ts in times.items():
            print(f"  {name:10s} median {statistics.median(ts) * 1000:8.1f} ms  "
                  f"(min {min(ts) * 1000:.1f}, max {max(ts) * 1000:.1f}, {len(ts)} runs); "
                  f"server CPU {cpu[name] * 1000 / len(ts):.1f} ms per run")
        ratio = statistics.median(times["qemu-nbd"]) / statistics.median(times["qcow2fast"])
        print(f"  qcow2fast / qemu-nbd speed: {ratio:.2f}x")
        return 0 if same else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
