"""Allocating 4 KiB writes over a populated backing file: traditional versus
extended L2 entries (subclusters), qcow2fast beside qemu-img bench.

    python -m benchmarks.subcluster_bench [--quick] [--runs N] [--json OUT] [--plot PNG]

The published experiment (Alberto Garcia, "Subcluster allocation for qcow2
images", 2020): 4 KiB random writes into an empty image whose backing file
is fully populated.  Without subclusters the first write to a cluster copies
the whole cluster from the backing file; with them, at most its 1/32nd.

Here: a backing qcow2 image fully written (1 GiB; 256 MiB with --quick),
page-cached; for every configuration (64 KiB, 128 KiB and 2 MiB clusters,
each with and without extended L2 entries) and run, a fresh empty overlay
per engine (after a sync, so no earlier run's dirty pages are written back
during this one), then ``count`` 4 KiB writes at offsets i * step mod size with a
scattering step (7919 * 4 KiB), the same for both engines: qemu-img bench
-w -d 1 -i io_uring -t writeback (the faster of unpinned and pinned to one
CPU) and qcow2fast's Image.write in one process.  The time is the request
loop (qemu-img bench's "Run completed in"); the growth is the overlay's
allocated bytes after close.  Every run is verified: both overlays pass
qemu-img check and compare equal to each other.
"""

import json
import os
import shutil
import sys
import time

from .common import (MiB, BenchError, bench_parser, choose_tmpdir, human, log, ratio_info, run,
                     summarise)
from .report import bar_groups, fmt_ratio, panels, rates, save_figure
from .io_engines import Qemu, qf_write
from .io_setup import probe_aio, warm_page_cache
from .io_config import FILL_PATTERN, REQ, WRITE_PATTERN

STEP = 7919 * REQ
CONFIGS = [(cs, ext) for cs in (64 << 10, 128 << 10, 2 << 20) for ext in (False, True)]
MODES = {"full": {"size": 1 << 30, "count": 8192, "runs": 5},
         "quick": {"size": 256 << 20, "count": 2048, "runs": 3}}


def label(cs, ext):
    return f"{human(cs)} {'extended' if ext else 'traditional'}"


def make_base(a, path):
    # FILL_PATTERN, not WRITE_PATTERN: a lost write would show the base's bytes.
    run([a.qemu_img, "create", "-q", "-f", "qcow2", path, str(a.size)])
    chunk = 1 * MiB
    run([a.qemu_img, "bench", "-f", "qcow2", "-w", "-c", str(a.size // chunk), "-d", "4",
         "-s", str(chunk), "-S", str(chunk), f"--pattern={FILL_PATTERN}", "-t", "writeback",
         "-i", a.aio, path])
    warm_page_cache(path)


def make_overlay(a, path, base, cs, ext):
    if os.path.exists(path):
        os.unlink(path)
    opts = f"cluster_size={cs},extended_l2={'on' if ext else 'off'}"
    run([a.qemu_img, "create", "-q", "-f", "qcow2", "-o", opts, "-b", base, "-F", "qcow2",
         path, str(a.size)])


def growth(path):
    return os.stat(path).st_blocks * 512


def bench_config(a, qcow2fast, tmpdir, base, cs, ext):
    offsets = [(i * STEP) % a.size for i in range(a.count)]
    data = bytes([WRITE_PATTERN]) * REQ
    qemu = Qemu(a.qemu_img, a.aio)
    cpu = sorted(os.sched_getaffinity(0))[0]
    samples = {"qemu": [], "qemu1": [], "qcow2fast": []}
    grown = {"qemu": [], "qcow2fast": []}
    paths = {e: os.path.join(tmpdir, f"{e}.qcow2") for e in samples}
    # The last configuration's overlays go first (unlinking one discards
    # its blocks, here on an ext4 mounted with -o discard), so that no
    # engine's first run pays for them.
    for path in paths.values():
        if os.path.exists(path):
            os.unlink(path)
    os.sync()
    for r in range(a.runs):
        for e in (samples if r % 2 == 0 else reversed(list(samples))):
            make_overlay(a, paths[e], base, cs, ext)
            # The previous runs' overlays (up to 1 GiB each with 2 MiB
            # clusters) are written back first, not during this run: that
            # backlog swung single runs of either engine by 3-7x here.
            os.sync()
            if e == "qcow2fast":
                t = qf_write(qcow2fast, paths[e], offsets, data)["loop"]
            else:
                t = qemu.bench(paths[e], a.count, STEP, True, cpu=cpu if e == "qemu1" else None)
                t = t["loop"]
            samples[e].append(t)
            if e in grown:
                grown[e].append(growth(paths[e]))
        for e in samples:
            p = run([a.qemu_img, "check", "-f", "qcow2", paths[e]], check=False)
            if p.returncode != 0:
                raise BenchError(f"qemu-img check of the {e} overlay ({label(cs, ext)}) "
                                 f"exited {p.returncode}:\n{p.stdout}{p.stderr}")
        for e in ("qemu", "qemu1"):
            p = run([a.qemu_img, "compare", paths[e], paths["qcow2fast"]], check=False)
            if p.returncode != 0:
                raise BenchError(f"{label(cs, ext)}: the {e} and qcow2fast overlays differ:"
                                 f"\n{p.stdout}{p.stderr}")
    best = min(("qemu", "qemu1"), key=lambda e: summarise(samples[e])["median"])
    iops = {e: a.count / summarise(s)["median"] for e, s in samples.items()}
    log(f"  {label(cs, ext)}: qemu {iops[best]:.0f} IOPS, qcow2fast {iops['qcow2fast']:.0f}")
    return {"cluster_size": cs, "extended_l2": ext, "count": a.count, "samples": samples,
            "qemu_best": best,
            "iops": iops, "growth": {e: summarise(g)["median"] for e, g in grown.items()},
            "ratio": ratio_info(samples[best], samples["qcow2fast"])}


def report(results, out=sys.stdout):
    print("\n| clusters | L2 entries | qemu IOPS | qcow2fast IOPS | vs qemu (range) | "
          "growth qemu / ours | subcluster gain qemu / ours |", file=out)
    print("|---|---|---|---|---|---|---|", file=out)
    trad = {r["cluster_size"]: r for r in results if not r["extended_l2"]}
    for r in results:
        q, f = r["iops"][r["qemu_best"]], r["iops"]["qcow2fast"]
        gain = "-"
        if r["extended_l2"] and r["cluster_size"] in trad:
            t = trad[r["cluster_size"]]
            gain = f"{q / t['iops'][t['qemu_best']]:.1f}x / {f / t['iops']['qcow2fast']:.1f}x"
        print(f"| {human(r['cluster_size'])} | {'extended' if r['extended_l2'] else 'traditional'}"
              f" | {q:,.0f} | {f:,.0f} | {fmt_ratio(r['ratio'])} | {r['growth']['qemu'] / MiB:.1f} / "
              f"{r['growth']['qcow2fast'] / MiB:.1f} MiB | {gain} |", file=out)


def plot(results, path):
    """IOPS (median, min-max over the runs; qemu: its faster placement) and
    growth per cluster size, traditional beside extended L2 entries."""
    sizes = sorted({r["cluster_size"] for r in results})
    by = {(r["cluster_size"], r["extended_l2"]): r for r in results}
    lines = [(e, ext) for e in ("qemu", "qcow2fast") for ext in (False, True)]
    label = {"qemu": "qemu-img", "qcow2fast": "qcow2fast"}
    names = [f"{label[e]}, {'extended' if ext else 'traditional'} L2" for e, ext in lines]
    iops, grown = [], []
    for e, ext in lines:
        rows = [by[cs, ext] for cs in sizes]
        iops.append([rates(r["count"], r["samples"][r["qemu_best"] if e == "qemu" else e])
                     for r in rows])
        grown.append([[r["growth"][e] / MiB] for r in rows])
    groups = [f"{human(cs)} clusters" for cs in sizes]
    fig, axes = panels(2, 5.2, 4.0)
    bar_groups(axes[0], groups, list(zip(names, iops)), "4 KiB writes / s",
               "allocating 4 KiB writes over a full backing file, QD 1", log=True)
    bar_groups(axes[1], groups, list(zip(names, grown)), "overlay size on disk (MiB)",
               f"overlay growth after {results[0]['count']} writes", log=True)
    save_figure(fig, path, legend=axes[0])


def main(argv=None):
    p = bench_parser("python -m benchmarks.subcluster_bench", __doc__,
                     "256 MiB, 2048 writes, 3 runs")
    p.add_argument("--count", type=int, help="writes per run")
    a = p.parse_args(argv)
    mode = MODES["quick" if a.quick else "full"]
    a.size, a.runs, a.count = mode["size"], a.runs or mode["runs"], a.count or mode["count"]
    if not shutil.which(a.qemu_img):
        p.error(f"{a.qemu_img} not found (Debian: apt-get install qemu-utils)")
    import qcow2fast
    try:
        tmpdir, _ = choose_tmpdir(a.tmpdir, 2 * a.size, prefix="qcow2fast-subcluster-bench-")
    except BenchError as e:
        log(f"subcluster_bench: {e}")
        return 1
    t0 = time.perf_counter()
    results = []
    try:
        a.aio, _ = probe_aio(a.qemu_img, tmpdir)
        base = os.path.join(tmpdir, "base.qcow2")
        make_base(a, base)
        log(f"subcluster_bench: backing file {human(a.size)}, {a.count} x 4 KiB writes, "
            f"{a.runs} runs, qemu -i {a.aio}")
        for cs, ext in CONFIGS:
            results.append(bench_config(a, qcow2fast, tmpdir, base, cs, ext))
    except BenchError as e:
        log(f"subcluster_bench: {e}")
        return 1
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    report(results)
    if a.plot:
        plot(results, a.plot)
    print(f"\ntotal time {time.perf_counter() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size": a.size, "count": a.count, "runs": a.runs, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
