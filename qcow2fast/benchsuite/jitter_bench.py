"""Latency jitter of small allocating writes under each cache mode, with lazy
refcounts on and off (after jitterd), qcow2fast beside qemu-io.

    python -m benchmarks.jitter_bench [--quick] [--json OUT] [--plot OUT.png]

A steady stream of 4 KiB writes, each into a new 64 KiB cluster of an empty
image (so every one allocates), at queue depth 1.  For every cache mode
(writeback, writethrough, none, directsync, unsafe) and lazy refcounts off
and on: the latency of every request, its percentiles, the worst stall, and
the total time spent in stalls over 200 ms per 10 s of run, and the
syncs (fsync and fdatasync calls) per write, counted by ``strace -f -c`` in
a separate, untimed run of the same writes (strace slows every syscall).
qcow2fast's
latencies come from its request loop; qemu's from qemu-io, one ``write``
command per request (qemu-io times each command itself: its "ops/sec" is
one over the request's latency).  Every run: both images pass qemu-img
check and compare equal.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from .common import ROOT, BenchError, bench_parser, log, run, scenario_main
from .report import md_table, panels, save_figure

CLUSTER = 64 << 10
REQ = 4096
PATTERN = 0x5A
MODES_CACHE = ["writeback", "writethrough", "none", "directsync", "unsafe"]
STALL_NS = 200_000_000
MODES = {"full": {"count": 20000}, "quick": {"count": 1000}}
SYNC_COUNT = 1000               # writes in the (untimed) run under strace
REPO = ROOT        # children import qcow2fast from where this one did
OPS_RE = re.compile(r"and ([0-9.]+) ops/sec\)")


def create(a, path, lazy):
    if os.path.exists(path):
        os.unlink(path)
    run([a.qemu_img, "create", "-q", "-f", "qcow2", "-o",
         f"cluster_size={CLUSTER},lazy_refcounts={'on' if lazy else 'off'}", path,
         str(a.count * CLUSTER)])


def qemu_io_command(a, path, cache, count):
    cmds = []
    for i in range(count):
        cmds += ["-c", f"write -P {PATTERN} {i * CLUSTER} {REQ}"]
    return [a.qemu_io, "-f", "qcow2", "-t", cache, *cmds, path]


def qemu_latencies(a, path, cache):
    p = run(qemu_io_command(a, path, cache, a.count))
    ops = [float(m) for m in OPS_RE.findall(p.stdout)]
    if len(ops) != a.count:
        raise BenchError(f"qemu-io printed {len(ops)} timings for {a.count} writes")
    return np.array([1e9 / o for o in ops], dtype=np.int64)


def qf_latencies(path, cache, count):
    import qcow2fast
    from qcow2fast.ops import bench
    with qcow2fast.open(path, "r+", cache_mode=cache, cache_clean_interval=0) as img:
        offs = np.arange(count, dtype=np.int64) * CLUSTER
        return bench.run(img, offs, bench.write_mask(count, 100, 0), REQ,
                         pattern=PATTERN).latencies_ns


def syncs_per_write(a, path, lazy, cache, engine):
    """fsync + fdatasync calls per write (opening and closing included),
    counted by strace over SYNC_COUNT writes into a fresh image."""
    count = min(SYNC_COUNT, a.count)
    create(a, path, lazy)
    if engine == "qemu":
        cmd = qemu_io_command(a, path, cache, count)
    else:
        cmd = [sys.executable, "-c", "import sys; from qcow2fast.benchsuite.jitter_bench "
               "import qf_latencies; qf_latencies(sys.argv[1], sys.argv[2], int(sys.argv[3]))",
               path, cache, str(count)]
    return count_syncs(a.strace, cmd) / count


def count_syncs(strace, cmd):
    """fsync + fdatasync calls made by ``cmd`` and its threads and children."""
    with tempfile.NamedTemporaryFile("r", prefix="jitter-strace-") as out:
        p = subprocess.run([strace, "-f", "-c", "-e", "trace=fsync,fdatasync", "-o",
                            out.name, *cmd], cwd=REPO, capture_output=True, text=True)
        if p.returncode != 0:
            raise BenchError(f"strace {' '.join(cmd[:3])} ... exited {p.returncode}: "
                             f"{p.stderr[-500:]}")
        table = out.read()
    # strace -c's table: "% time seconds usecs/call calls [errors] syscall".
    return sum(int(m[1]) for m in re.finditer(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)"
                                              r"(?:\s+\d+)?\s+(?:fsync|fdatasync)\s*$",
                                              table, re.M))


def summary(lat):
    """Percentiles (µs), the worst stall and the stall time per 10 s of run."""
    total = float(lat.sum()) / 1e9
    stalls = float(lat[lat > STALL_NS].sum()) / 1e9
    p = np.percentile(lat, [50, 99, 99.9]) / 1000
    return {"p50_us": p[0], "p99_us": p[1], "p999_us": p[2], "max_ms": float(lat.max()) / 1e6,
            "run_s": total, "stall_s_per_10s": stalls * 10 / total if total else 0.0}


def collect(a, tmpdir):
    results = []
    paths = {"qemu": os.path.join(tmpdir, "q.qcow2"), "qcow2fast": os.path.join(tmpdir, "f.qcow2")}
    for lazy in (False, True):
        for cache in MODES_CACHE:
            lat = {}
            for e, path in paths.items():
                create(a, path, lazy)
                lat[e] = (qemu_latencies(a, path, cache) if e == "qemu"
                          else qf_latencies(path, cache, a.count))
                run([a.qemu_img, "check", path])
            if run([a.qemu_img, "compare", *paths.values()], check=False).returncode:
                raise BenchError(f"{cache}, lazy={lazy}: the images differ")
            row = {"cache": cache, "lazy_refcounts": lazy,
                   "summary": {e: summary(v) for e, v in lat.items()},
                   "syncs_per_write": {e: syncs_per_write(a, path, lazy, cache, e)
                                       for e, path in paths.items()},
                   "latencies_us": {e: (v / 1000).round(1).tolist() for e, v in lat.items()}}
            s = row["summary"]
            log(f"  {cache:12} lazy={'on ' if lazy else 'off'}: p99 qemu {s['qemu']['p99_us']:.0f}"
                f" us / qcow2fast {s['qcow2fast']['p99_us']:.0f} us, max "
                f"{s['qemu']['max_ms']:.1f} / {s['qcow2fast']['max_ms']:.1f} ms")
            results.append(row)
    return results


def report(results, out=sys.stdout):
    print("\nLatency of 4 KiB allocating writes, qemu-io / qcow2fast:\n", file=out)
    rows = []
    for r in results:
        q, f = r["summary"]["qemu"], r["summary"]["qcow2fast"]
        rows.append([r["cache"], "on" if r["lazy_refcounts"] else "off",
                     f"{q['p50_us']:.1f} / {f['p50_us']:.1f}",
                     f"{q['p99_us']:.0f} / {f['p99_us']:.0f}",
                     f"{q['p999_us']:.0f} / {f['p999_us']:.0f}",
                     f"{q['max_ms']:.1f} / {f['max_ms']:.1f}",
                     f"{q['stall_s_per_10s']:.2f} / {f['stall_s_per_10s']:.2f} s",
                     " / ".join(f"{r['syncs_per_write'][e]:.2f}" for e in ("qemu", "qcow2fast"))])
    md_table(["cache", "lazy refcounts", "p50 us", "p99 us", "p99.9 us", "worst ms",
              "stalls > 200 ms per 10 s", "syncs per write"], rows, out)


def plot(results, path):
    """Latency over the run, one panel per cache mode (lazy refcounts off)."""
    rows = [r for r in results if not r["lazy_refcounts"]]
    fig, axes = panels(len(rows), 3.8, 3.4)
    for ax, r in zip(axes, rows):
        for e in ("qemu", "qcow2fast"):
            ax.plot(r["latencies_us"][e], ".", markersize=1.5,
                    label="qemu-io" if e == "qemu" else e)
        ax.set_yscale("log")
        ax.set_title(f"cache={r['cache']}")
        ax.set_xlabel("request")
        ax.set_ylabel("latency (us)")
    axes[0].legend(markerscale=6)
    save_figure(fig, path)


def main(argv=None):
    p = bench_parser("python -m benchmarks.jitter_bench", __doc__, "1000 writes per configuration")
    p.add_argument("--qemu-io", default=shutil.which("qemu-io") or "qemu-io")
    p.add_argument("--strace", default=shutil.which("strace") or "strace",
                   help="counts the syncs (Debian: apt-get install strace)")
    a = p.parse_args(argv)
    a.count = MODES["quick" if a.quick else "full"]["count"]
    for tool, package in ((a.qemu_img, "qemu-utils"), (a.qemu_io, "qemu-utils"),
                          (a.strace, "strace")):
        if not shutil.which(tool):
            p.error(f"{tool} not found (Debian: apt-get install {package})")
    return scenario_main(a, "jitter-bench", 2 * a.count * REQ + (64 << 20), collect, report,
                         plot, {"count": a.count})


if __name__ == "__main__":
    sys.exit(main())
