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
"""

import os
import sys

from .common import (GiB, MiB, BenchError, bench_parser, human, log, parse_mode, run,
                     scenario_main, summarise)
from .io_bench import warm_page_cache
from .report import md_table, panels, save_figure
from .io_config import RUN_RE

STEP = 104729 * 4096        # ~409 MiB: neighbours fall in different L2 slices
CONFIGS = [(64 << 10, 4096), (64 << 10, 64 << 10), (2 << 20, 4096), (2 << 20, 2 << 20)]
FRACTIONS = [1 / 64, 1 / 16, 1 / 4, 1 / 2, 1, 2]
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


def qemu_read(a, path, l2, entry):
    opts = (f"driver=qcow2,file.filename={path},l2-cache-size={l2},"
            f"l2-cache-entry-size={entry},cache-clean-interval=0")
    p = run([a.qemu_img, "bench", "--image-opts", opts, "-c", str(a.count), "-d", "1",
             "-s", "4096", "-S", str(STEP), "-i", a.aio, "-t", "writeback"])
    m = RUN_RE.search(p.stdout)
    if not m:
        raise BenchError(f"unexpected qemu-img bench output:\n{p.stdout}{p.stderr}")
    return float(m[1])


def qf_read(a, path, l2, entry):
    import qcow2fast
    from qcow2fast import bench
    with qcow2fast.open(path, l2_cache_size=l2, l2_cache_entry_size=entry,
                        cache_clean_interval=0) as img:
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
            for l2 in sizes:
                t_q, t_f, hit = [], [], []
                for r in range(a.runs):
                    t_q.append(qemu_read(a, path, l2, entry))
                    t, h = qf_read(a, path, l2, entry)
                    t_f.append(t)
                    hit.append(h)
                row = {"cluster_size": cs, "entry_size": entry, "l2_cache_size": l2,
                       "covers": l2 / full,
                       "qemu_iops": a.count / summarise(t_q)["median"],
                       "qcow2fast_iops": a.count / summarise(t_f)["median"],
                       "qcow2fast_hit_rate": summarise(hit)["median"],
                       "samples": {"qemu": t_q, "qcow2fast": t_f}}
                log(f"  {human(cs)} clusters, entry {human(entry)}, L2 cache {human(l2)} "
                    f"({row['covers']:.0%} of the disk): qemu {row['qemu_iops']:,.0f}, "
                    f"qcow2fast {row['qcow2fast_iops']:,.0f} IOPS, "
                    f"hit rate {row['qcow2fast_hit_rate']:.1%}")
                results.append(row)
        os.unlink(path)
    return results


def report(results, out=sys.stdout):
    print(file=out)
    md_table(["clusters", "entry", "L2 cache", "covers", "qemu IOPS", "qcow2fast IOPS", "vs qemu",
              "hit rate"],
             [[human(r["cluster_size"]), human(r["entry_size"]), human(r["l2_cache_size"]),
               f"{r['covers']:.0%}", f"{r['qemu_iops']:,.0f}", f"{r['qcow2fast_iops']:,.0f}",
               f"{r['qcow2fast_iops'] / r['qemu_iops']:.2f}x", f"{r['qcow2fast_hit_rate']:.1%}"]
              for r in results], out)


def plot(results, path):
    """IOPS against L2 cache size, one panel per (cluster size, entry size)."""
    fig, axes = panels(len(CONFIGS))
    for ax, (cs, entry) in zip(axes, CONFIGS):
        rows = [r for r in results if (r["cluster_size"], r["entry_size"]) == (cs, entry)]
        x = [r["l2_cache_size"] / 1024 for r in rows]
        ax.plot(x, [r["qemu_iops"] for r in rows], "o-", label="qemu-img bench")
        ax.plot(x, [r["qcow2fast_iops"] for r in rows], "s-", label="qcow2fast")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{human(cs)} clusters, entry {human(entry)}")
        ax.set_xlabel("L2 cache size (KiB)")
        ax.set_ylabel("4 KiB random reads / s")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    save_figure(fig, path)


def main(argv=None):
    p = bench_parser("python -m benchmarks.l2cache_bench", __doc__,
                     "2 GiB images, 8000 reads per point, 1 run")
    a = parse_mode(p, argv, MODES)
    meta = {"size": a.size, "count": a.count, "runs": a.runs}
    return scenario_main(a, "l2cache-bench", 256 * MiB, collect, report, plot, meta, aio=True)


if __name__ == "__main__":
    sys.exit(main())
