"""4 KiB random-read IOPS versus L2 cache size, qcow2fast beside qemu-img bench.

    python -m benchmarks.l2cache_bench [--quick] [--runs N] [--json OUT] [--plot OUT.png]

The experiment of qemu's docs/qcow2-cache.txt: a fully mapped image (20 GiB
virtual, preallocation=metadata; 2 GiB with --quick) read at 4 KiB
requests scattered over the whole disk (offsets i * 104729 * 4 KiB mod size,
queue depth 1) with L2 caches from far too small to covering the disk, for
64 KiB and 2 MiB clusters and for l2-cache-entry-size 4 KiB and a whole
cluster.  Once the cache covers the working set every lookup hits and IOPS
jump (the published result: more than 10x).  qemu gets the sizes through
--image-opts; qcow2fast through open()'s options, with its cache hit rate.

Each point runs under two cache modes:

- ``none`` (O_DIRECT), the published setting: an L2 cache miss reads its
  entry from the device, while the data clusters of a preallocated image are
  holes that read as zeros without device I/O -- so the miss cost dominates
  and the jump shows in full;
- ``writeback``: the image file is page-cached, so a miss costs a copy from
  the page cache, and the jump is only the lookup's share of a cached read.
"""

import os
import sys

from .common import (GiB, MiB, BenchError, bench_parser, human, log, parse_mode, run,
                     scenario_main, summarise)
from .io_setup import warm_page_cache
from .report import md_table, panels, save_figure
from .io_config import RUN_RE

STEP = 104729 * 4096        # ~409 MiB: neighbours fall in different L2 slices
CONFIGS = [(64 << 10, 4096), (64 << 10, 64 << 10), (2 << 20, 4096), (2 << 20, 2 << 20)]
FRACTIONS = [1 / 64, 1 / 16, 1 / 4, 1 / 2, 1, 2]
CACHE_MODES = ["none", "writeback"]
MODES = {"full": {"size": 20 * GiB, "count": 40000, "runs": 3},
         "quick": {"size": 2 * GiB, "count": 8000, "runs": 1}}


def cache_sizes(size, cs, entry):
    """The L2 cache sizes tried: fractions of what maps the whole disk,
    whole entries, at least the two entries qemu requires."""
    full = size // cs * 8
    out = []
    for f in FRACTIONS:
        n = max(2 * entry, int(full * f) // entry * entry)
        if n not in out:
            out.append(n)
    return out, full


def qemu_read(a, path, l2, entry, cache):
    opts = (f"driver=qcow2,file.filename={path},l2-cache-size={l2},"
            f"l2-cache-entry-size={entry},cache-clean-interval=0")
    p = run([a.qemu_img, "bench", "--image-opts", opts, "-c", str(a.count), "-d", "1",
             "-s", "4096", "-S", str(STEP), "-i", a.aio, "-t", cache])
    m = RUN_RE.search(p.stdout)
    if not m:
        raise BenchError(f"unexpected qemu-img bench output:\n{p.stdout}{p.stderr}")
    return float(m[1])


def qf_read(a, path, l2, entry, cache):
    import qcow2fast
    from qcow2fast.ops import bench
    with qcow2fast.open(path, l2_cache_size=l2, l2_cache_entry_size=entry,
                        cache_clean_interval=0, cache_mode=cache) as img:
        offs = bench.sequential_offsets(a.count, 0, STEP, img.size)
        reads = bench.write_mask(a.count, 0, 0)
        before = img.cache_stats
        result = bench.run(img, offs, reads, 4096)
        after = img.cache_stats
    hits = after["l2_hits"] - before["l2_hits"]
    misses = after["l2_misses"] - before["l2_misses"]
    return result.elapsed, hits / max(1, hits + misses)


def collect(a, tmpdir):
    results = []
    for cs in sorted({cs for cs, _ in CONFIGS}):
        path = os.path.join(tmpdir, f"l2-{human(cs)}.qcow2")
        run([a.qemu_img, "create", "-q", "-f", "qcow2", "-o",
             f"cluster_size={cs},preallocation=metadata", path, str(a.size)])
        warm_page_cache(path)
        for cs2, entry in CONFIGS:
            if cs2 != cs:
                continue
            sizes, full = cache_sizes(a.size, cs, entry)
            for cache in CACHE_MODES:
                for l2 in sizes:
                    results.append(measure(a, path, cs, entry, cache, l2, full))
        os.unlink(path)
    return results


def measure(a, path, cs, entry, cache, l2, full):
    t_q, t_f, hit = [], [], []
    for r in range(a.runs):
        t_q.append(qemu_read(a, path, l2, entry, cache))
        t, h = qf_read(a, path, l2, entry, cache)
        t_f.append(t)
        hit.append(h)
    row = {"cluster_size": cs, "entry_size": entry, "cache": cache, "l2_cache_size": l2,
           "covers": l2 / full,
           "qemu_iops": a.count / summarise(t_q)["median"],
           "qcow2fast_iops": a.count / summarise(t_f)["median"],
           "qcow2fast_hit_rate": summarise(hit)["median"],
           "samples": {"qemu": t_q, "qcow2fast": t_f}}
    log(f"  {human(cs)} clusters, entry {human(entry)}, cache={cache}, L2 cache {human(l2)} "
        f"({row['covers']:.0%} of the disk): qemu {row['qemu_iops']:,.0f}, "
        f"qcow2fast {row['qcow2fast_iops']:,.0f} IOPS, "
        f"hit rate {row['qcow2fast_hit_rate']:.1%}")
    return row


def jumps(results):
    """Per (cluster size, entry size, cache mode): IOPS with the cache
    covering the disk over IOPS with the smallest cache, for each engine."""
    out = []
    for cs, entry in CONFIGS:
        for cache in CACHE_MODES:
            rows = [r for r in results if (r["cluster_size"], r["entry_size"], r["cache"])
                    == (cs, entry, cache)]
            if len(rows) < 2 or rows[0]["covers"] >= 1:
                continue
            full = min((r for r in rows if r["covers"] >= 1), key=lambda r: r["covers"])
            out.append({"cluster_size": cs, "entry_size": entry, "cache": cache,
                        **{e: full[f"{e}_iops"] / rows[0][f"{e}_iops"]
                           for e in ("qemu", "qcow2fast")}})
    return out


def report(results, out=sys.stdout):
    print(file=out)
    md_table(["clusters", "entry", "cache", "L2 cache", "covers", "qemu IOPS", "qcow2fast IOPS",
              "vs qemu", "hit rate"],
             [[human(r["cluster_size"]), human(r["entry_size"]), r["cache"],
               human(r["l2_cache_size"]), f"{r['covers']:.0%}", f"{r['qemu_iops']:,.0f}",
               f"{r['qcow2fast_iops']:,.0f}", f"{r['qcow2fast_iops'] / r['qemu_iops']:.2f}x",
               f"{r['qcow2fast_hit_rate']:.1%}"]
              for r in results], out)
    print("\nThe jump: IOPS once the cache covers the disk / IOPS with the smallest cache\n",
          file=out)
    md_table(["clusters", "entry", "cache", "qemu", "qcow2fast"],
             [[human(j["cluster_size"]), human(j["entry_size"]), j["cache"],
               f"{j['qemu']:.1f}x", f"{j['qcow2fast']:.1f}x"] for j in jumps(results)], out)


def plot(results, path):
    """IOPS against L2 cache size, one panel per (cluster size, entry size),
    a line per engine and cache mode (log scale: the modes differ 10x)."""
    fig, axes = panels(len(CONFIGS))
    for ax, (cs, entry) in zip(axes, CONFIGS):
        for cache, style in (("none", "-"), ("writeback", "--")):
            rows = [r for r in results
                    if (r["cluster_size"], r["entry_size"], r["cache"]) == (cs, entry, cache)]
            x = [r["l2_cache_size"] / 1024 for r in rows]
            ax.plot(x, [r["qemu_iops"] for r in rows], "o" + style, color="C0",
                    label=f"qemu-img bench, cache={cache}")
            ax.plot(x, [r["qcow2fast_iops"] for r in rows], "s" + style, color="C1",
                    label=f"qcow2fast, cache={cache}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{human(cs)} clusters, entry {human(entry)}")
        ax.set_xlabel("L2 cache size (KiB)")
        ax.set_ylabel("4 KiB random reads / s")
        ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path, legend=axes[0])


def main(argv=None):
    p = bench_parser("python -m benchmarks.l2cache_bench", __doc__,
                     "2 GiB images, 8000 reads per point, 1 run")
    a = parse_mode(p, argv, MODES)
    meta = {"size": a.size, "count": a.count, "runs": a.runs}
    return scenario_main(a, "l2cache-bench", 256 * MiB, collect, report, plot, meta, aio=True)


if __name__ == "__main__":
    sys.exit(main())
