"""Cluster size: sequential and random 4 KiB read and write IOPS, image
growth and metadata size for cluster sizes 4 KiB to 2 MiB, qcow2fast beside
qemu-img bench.

    python -m benchmarks.clustersize_bench [--quick] [--runs N] [--json OUT] [--plot OUT.png]

For every cluster size and run, per engine: ``count`` 4 KiB writes into a
fresh empty image (sequential: step 4 KiB; random: offsets i * 7919 * 4 KiB
mod size), then the same reads of that image once it is page-cached.  Both
engines run queue depth 1, qemu with -i io_uring -t writeback (the faster
of unpinned and pinned to one CPU).  Growth is the file's allocated bytes
per byte written (after the random writes); metadata is what the file
holds below its end beyond the data clusters ``qemu-img check`` counts.
qcow2fast leaves the unwritten part of a new cluster a hole where qemu
allocates it, hence the smaller growth.  Every run: both images pass
qemu-img check and compare equal.
"""

import json
import os
import sys

from .common import (MiB, BenchError, bench_parser, human, log, parse_mode, run, scenario_main,
                     summarise)
from .io_engines import Qemu
from .io_setup import warm_page_cache
from .io_config import REQ, WRITE_PATTERN
from .report import md_table, panels, save_figure

CLUSTERS = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20]
PATTERNS = {"seq": REQ, "random": 7919 * REQ}
MODES = {"full": {"size": 1 << 30, "count": 16384, "runs": 3},
         "quick": {"size": 128 << 20, "count": 2048, "runs": 1}}


def create(a, path, cs):
    if os.path.exists(path):
        os.unlink(path)
    run([a.qemu_img, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", path,
         str(a.size)])


def qf_loop(path, offsets, write):
    import qcow2fast
    from qcow2fast.ops import bench
    with qcow2fast.open(path, "r+" if write else "r", cache_clean_interval=0) as img:
        writes = bench.write_mask(len(offsets), 100 if write else 0, 0)
        return bench.run(img, offsets, writes, REQ, pattern=WRITE_PATTERN).elapsed


def metadata_bytes(a, path, cs):
    """Host bytes below the image's end that are not data clusters: header,
    tables, refcount structures (and leaks, which check would report)."""
    info = json.loads(run([a.qemu_img, "check", "--output=json", path]).stdout)
    return info["image-end-offset"] - info.get("allocated-clusters", 0) * cs


def bench_cluster(a, tmpdir, cs):
    from qcow2fast.ops import bench
    qemu = Qemu(a.qemu_img, a.aio)
    cpu = sorted(os.sched_getaffinity(0))[0]
    paths = {"qemu": os.path.join(tmpdir, "q.qcow2"), "qcow2fast": os.path.join(tmpdir, "f.qcow2")}
    row = {"cluster_size": cs, "iops": {}, "samples": {}}
    for pattern, step in PATTERNS.items():
        offsets = bench.sequential_offsets(a.count, 0, step, a.size)
        for op in ("write", "read"):
            samples = {"qemu": [], "qcow2fast": []}
            for r in range(a.runs):
                for e in paths:
                    times = []
                    # qemu: unpinned and pinned to one CPU, each on a fresh
                    # image when writing (a second run would time overwrites).
                    for c in ((None,) if e == "qcow2fast" else (None, cpu)):
                        if op == "write":
                            create(a, paths[e], cs)
                        else:
                            warm_page_cache(paths[e])
                        times.append(qf_loop(paths[e], offsets, op == "write")
                                     if e == "qcow2fast" else
                                     qemu.bench(paths[e], a.count, step, op == "write",
                                                cpu=c)["loop"])
                    samples[e].append(min(times))
                if op == "write":
                    for e in paths:
                        run([a.qemu_img, "check", paths[e]])
                    if run([a.qemu_img, "compare", *paths.values()], check=False).returncode:
                        raise BenchError(f"{human(cs)} {pattern} writes: the images differ")
            key = f"{op}-{pattern}"
            row["samples"][key] = samples
            row["iops"][key] = {e: a.count / summarise(s)["median"] for e, s in samples.items()}
        if pattern == "random":
            written = len(set(offsets.tolist())) * REQ
            row["growth"] = {e: os.stat(p).st_blocks * 512 / written for e, p in paths.items()}
            row["metadata"] = {e: metadata_bytes(a, p, cs) for e, p in paths.items()}
    log(f"  {human(cs)}: " + ", ".join(f"{k} qemu {v['qemu']:,.0f} / qcow2fast "
                                       f"{v['qcow2fast']:,.0f}" for k, v in row["iops"].items()))
    return row


def collect(a, tmpdir):
    return [bench_cluster(a, tmpdir, cs) for cs in CLUSTERS]


def report(results, out=sys.stdout):
    keys = [f"{op}-{p}" for p in PATTERNS for op in ("write", "read")]
    print("\nIOPS, qemu-img bench / qcow2fast (queue depth 1, 4 KiB):\n", file=out)
    md_table(["clusters", *keys, "growth qemu / ours", "metadata qemu / ours"],
             [[human(r["cluster_size"]),
               *(f"{r['iops'][k]['qemu']:,.0f} / {r['iops'][k]['qcow2fast']:,.0f}" for k in keys),
               f"{r['growth']['qemu']:.2f} / {r['growth']['qcow2fast']:.2f}",
               f"{r['metadata']['qemu'] / 1024:,.0f} / {r['metadata']['qcow2fast'] / 1024:,.0f} KiB"]
              for r in results], out)


def plot(results, path):
    keys = [f"{op}-{p}" for p in PATTERNS for op in ("write", "read")]
    fig, axes = panels(len(keys))
    x = [r["cluster_size"] / 1024 for r in results]
    for ax, k in zip(axes, keys):
        for e, marker in (("qemu", "o-"), ("qcow2fast", "s-")):
            ax.plot(x, [r["iops"][k][e] for r in results], marker,
                    label="qemu-img bench" if e == "qemu" else e)
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_title(k)
        ax.set_xlabel("cluster size (KiB)")
        ax.set_ylabel("4 KiB requests / s")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    save_figure(fig, path)


def main(argv=None):
    p = bench_parser("python -m benchmarks.clustersize_bench", __doc__,
                     "128 MiB images, 2048 requests, 1 run")
    a = parse_mode(p, argv, MODES)
    meta = {"size": a.size, "count": a.count, "runs": a.runs}
    return scenario_main(a, "clustersize-bench", 2 * a.size + 64 * MiB, collect, report, plot,
                         meta, aio=True)


if __name__ == "__main__":
    sys.exit(main())
