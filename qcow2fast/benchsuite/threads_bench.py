"""Cached 4 KiB reads and overwrites at queue depth 1, 2 and 4: qcow2fast
(one thread per request in flight, sharing one image) beside qemu-img bench
(-d N, -i io_uring) and a raw-file pread/pwrite loop in as many threads on
the same data (the physical limit).  A second limit, "host", is the same
loop on the qcow2 file itself at the host offsets the requests map to
(``qemu-img map``): the very pages both engines touch.  It matters for
overwrites: a 4 KiB write into a clean page-cache page costs time in
proportion to the size of the folio holding it (ext4 walks its buffer
heads), and the qcow2 file's and the raw copy's folios differ.

qcow2fast's side is ``qcow2fast bench``'s loop (``bench.run``): every
request is a call of the image's ``readinto``/``write`` made from a C loop
that also times it.  The raw side is a plain Python loop of
``os.preadv``/``os.pwrite`` that times nothing.

    python -m benchmarks.threads_bench [--quick] [--runs N] [--json OUT] [--plot OUT.png]

The data image is fully written and page-cached (1 GiB; 256 MiB with
--quick); offsets are i * 7919 * 4 KiB mod size for every engine.  Every
timed run starts after a sync, so no engine's overwrites are slowed by the
write-back of the previous runs' dirty pages.
"""

import os
import sys
import threading
import time

from .common import (MiB, BenchError, bench_parser, log, parse_mode, ratio_info, run,
                     scenario_main, summarise)
from .io_bench import Qemu, host_map, settle_page_cache
from .io_config import FILL_PATTERN, REQ, WRITE_PATTERN
from .report import fmt_ratio, md_table, panels, save_figure

STEP = 7919 * REQ
DEPTHS = [1, 2, 4]
MODES = {"full": {"size": 1 << 30, "count": 100000, "runs": 3},
         "quick": {"size": 256 << 20, "count": 20000, "runs": 1}}


def raw_loop(path, offsets, write, threads):
    """pread/pwrite of the same offsets in ``threads`` threads (striped)."""
    fd = os.open(path, os.O_RDWR)
    data = bytes([WRITE_PATTERN]) * REQ

    def worker(w):
        buf = [bytearray(REQ)]
        for off in offsets[w::threads]:
            if write:
                os.pwrite(fd, data, off)
            else:
                os.preadv(fd, buf, off)
    try:
        t0 = time.perf_counter()
        pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def qf_loop(path, offsets, write, depth):
    import qcow2fast
    from qcow2fast.ops import bench
    with qcow2fast.open(path, "r+" if write else "r", cache_clean_interval=0) as img:
        return bench.run(img, offsets, bench.write_mask(len(offsets), 100 if write else 0, 0),
                         REQ, depth=depth, pattern=WRITE_PATTERN).elapsed


def collect(a, tmpdir):
    from qcow2fast.ops import bench
    qcow2, raw = os.path.join(tmpdir, "data.qcow2"), os.path.join(tmpdir, "data.raw")
    run([a.qemu_img, "create", "-q", "-f", "qcow2", qcow2, str(a.size)])
    run([a.qemu_img, "bench", "-f", "qcow2", "-w", "-c", str(a.size // MiB), "-d", "4",
         "-s", str(MiB), "-S", str(MiB), f"--pattern={FILL_PATTERN}", "-t", "writeback",
         "-i", a.aio, qcow2])
    run([a.qemu_img, "convert", "-O", "raw", qcow2, raw])
    settle_page_cache(qcow2, raw)
    offsets = bench.sequential_offsets(a.count, 0, STEP, a.size).tolist()
    to_host = host_map(a.qemu_img, qcow2)
    host_offsets = [to_host(off) for off in offsets]
    qemu = Qemu(a.qemu_img, a.aio)
    results = []
    for op in ("read", "overwrite"):
        write = op == "overwrite"
        for depth in DEPTHS:
            cmd = qemu.command(qcow2, a.count, STEP, write)
            cmd[cmd.index("-d") + 1] = str(depth)
            engines = {
                "qemu": lambda: float(run(cmd).stdout.rsplit("Run completed in ", 1)[1]
                                      .split()[0]),
                "qcow2fast": lambda: qf_loop(qcow2, offsets, write, depth),
                "raw": lambda: raw_loop(raw, offsets, write, depth),
                # The same data at the same guest offsets: the image stays
                # equal to the raw copy.
                "host": lambda: raw_loop(qcow2, host_offsets, write, depth)}
            t = {e: [] for e in engines}
            for r in range(a.runs):
                for e, timed in engines.items():
                    # Every engine starts with no dirty pages: the earlier
                    # runs' overwrites are not written back during this one.
                    os.sync()
                    t[e].append(timed())
            iops = {e: a.count / summarise(s)["median"] for e, s in t.items()}
            row = {"op": op, "depth": depth, "samples": t, "iops": iops,
                   "vs_qemu": ratio_info(t["qemu"], t["qcow2fast"]),
                   "vs_raw": ratio_info(t["raw"], t["qcow2fast"]),
                   "vs_host": ratio_info(t["host"], t["qcow2fast"])}
            log(f"  {op} depth {depth}: qemu {iops['qemu']:,.0f}, qcow2fast "
                f"{iops['qcow2fast']:,.0f}, raw {iops['raw']:,.0f}, host {iops['host']:,.0f} IOPS")
            results.append(row)
    if run([a.qemu_img, "compare", "-f", "qcow2", "-F", "raw", qcow2, raw],
           check=False).returncode:
        raise BenchError("the overwritten qcow2 image and raw file differ")
    return results


def report(results, out=sys.stdout):
    print("\nCached 4 KiB requests, IOPS:\n", file=out)
    md_table(["op", "depth", "qemu-img bench", "qcow2fast", "raw pread/pwrite", "host",
              "vs qemu", "vs raw", "vs host"],
             [[r["op"], r["depth"], f"{r['iops']['qemu']:,.0f}", f"{r['iops']['qcow2fast']:,.0f}",
               f"{r['iops']['raw']:,.0f}", f"{r['iops']['host']:,.0f}", fmt_ratio(r["vs_qemu"]),
               fmt_ratio(r["vs_raw"]), fmt_ratio(r["vs_host"])]
              for r in results], out)


def plot(results, path):
    fig, axes = panels(2)
    for ax, op in zip(axes, ("read", "overwrite")):
        rows = [r for r in results if r["op"] == op]
        for e, style in (("qemu", "o-"), ("qcow2fast", "s-"), ("raw", "^--"), ("host", "v:")):
            ax.plot([r["depth"] for r in rows], [r["iops"][e] for r in rows], style,
                    label={"qemu": "qemu-img bench", "raw": "raw pread/pwrite",
                           "host": "pread/pwrite on the qcow2 file"}.get(e, e))
        ax.set_ylim(bottom=0)
        ax.set_xticks(DEPTHS)
        ax.set_title(f"cached 4 KiB {op}s")
        ax.set_xlabel("queue depth (threads)")
        ax.set_ylabel("requests / s")
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    save_figure(fig, path)


def main(argv=None):
    p = bench_parser("python -m benchmarks.threads_bench", __doc__,
                     "256 MiB image, 20000 requests, 1 run")
    a = parse_mode(p, argv, MODES)
    meta = {"size": a.size, "count": a.count, "runs": a.runs}
    return scenario_main(a, "threads-bench", 2 * a.size + 64 * MiB, collect, report, plot, meta,
                         aio=True)


if __name__ == "__main__":
    sys.exit(main())
