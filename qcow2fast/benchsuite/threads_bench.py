"""Cached 4 KiB reads and overwrites at queue depths 1 to 32: qcow2fast
beside qemu-img bench (-d N, -i io_uring) and fio (--ioengine=io_uring
--iodepth=N, the C-level limit) on the same data.

qcow2fast's side is ``qcow2fast bench``'s loop (``bench.run``): at depth 1
every request is a call of the image's ``readinto``/``write`` from a C
loop that times it; at depth N > 1, one worker thread per usable CPU (at
most N), each keeping its share of the N requests in flight as batches
through the batched path (``_ext/batch.pyx``: resolved and issued together
in C, io_uring or a pread/pwrite loop, the GIL released for the worker's
whole loop).  ``qcow2fast
(threads)`` is the old way, N Python threads sharing the image, each with
one request in flight.  fio runs random 4 KiB requests over the raw copy
of the same data (``--rw=randread``/``randwrite``, page-cached, no
fsync; a copy of its own, as its offsets differ), as many as the others.

    python -m benchmarks.threads_bench [--quick] [--runs N] [--json OUT] [--plot OUT.png]

The data image is fully written and page-cached (1 GiB; 256 MiB and depths
1, 4 and 16 with --quick); offsets are i * 7919 * 4 KiB mod size for qemu and qcow2fast.
Every timed run starts after a sync, so no engine's overwrites are slowed
by the write-back of the previous runs' dirty pages.
"""

import json
import os
import shutil
import sys

from .common import (MiB, BenchError, bench_parser, log, parse_mode, ratio_info, run,
                     scenario_main, summarise)
from .io_engines import Qemu
from .io_setup import settle_page_cache
from .io_config import FILL_PATTERN, REQ, WRITE_PATTERN
from .report import fmt_ratio, md_table, panels, save_figure

STEP = 7919 * REQ
DEPTHS = [1, 2, 4, 8, 16, 32]
MODES = {"full": {"size": 1 << 30, "count": 100000, "runs": 3},
         "quick": {"size": 256 << 20, "count": 20000, "runs": 1}}
QUICK_DEPTHS = [1, 4, 16]         # --quick: fewer depths (the suite's quick run stays short)
ENGINES = ("qemu", "qcow2fast", "qcow2fast (threads)", "fio")


def qf_loop(path, offsets, write, depth, threads=False):
    import qcow2fast
    from qcow2fast.ops import bench
    with qcow2fast.open(path, "r+" if write else "r", cache_clean_interval=0) as img:
        return bench.run(img, offsets, bench.write_mask(len(offsets), 100 if write else 0, 0),
                         REQ, depth=depth, pattern=WRITE_PATTERN, threads=threads).elapsed


def fio_loop(path, count, write, depth):
    """fio's time for ``count`` random 4 KiB requests, ``depth`` in flight
    through io_uring, on the page-cached file ``path``."""
    p = run(["fio", "--name=qd", f"--filename={path}", "--ioengine=io_uring",
             f"--iodepth={depth}", f"--rw={'randwrite' if write else 'randread'}",
             f"--bs={REQ}", f"--number_ios={count}", "--norandommap",
             "--random_generator=lfsr", "--invalidate=0", "--direct=0",
             "--thread", "--output-format=json"])
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = job["write" if write else "read"]
    if side["total_ios"] < count:
        raise BenchError(f"fio did {side['total_ios']} requests, {count} asked")
    return count / side["iops"]


def collect(a, tmpdir):
    from qcow2fast.ops import bench
    if not shutil.which("fio"):
        raise BenchError("fio not found (Debian: apt-get install fio)")
    qcow2, raw = os.path.join(tmpdir, "data.qcow2"), os.path.join(tmpdir, "data.raw")
    run([a.qemu_img, "create", "-q", "-f", "qcow2", qcow2, str(a.size)])
    run([a.qemu_img, "bench", "-f", "qcow2", "-w", "-c", str(a.size // MiB), "-d", "4",
         "-s", str(MiB), "-S", str(MiB), f"--pattern={FILL_PATTERN}", "-t", "writeback",
         "-i", a.aio, qcow2])
    run([a.qemu_img, "convert", "-O", "raw", qcow2, raw])
    fio_file = os.path.join(tmpdir, "fio.raw")      # fio's random writes go here
    shutil.copyfile(raw, fio_file)
    settle_page_cache(qcow2, raw, fio_file)
    offsets = bench.sequential_offsets(a.count, 0, STEP, a.size).tolist()
    qemu = Qemu(a.qemu_img, a.aio)
    log(f"  load average before: {os.getloadavg()}")
    results = []
    for op in ("read", "overwrite"):
        write = op == "overwrite"
        for depth in (QUICK_DEPTHS if a.quick else DEPTHS):
            cmd = qemu.command(qcow2, a.count, STEP, write)
            cmd[cmd.index("-d") + 1] = str(depth)
            engines = {
                "qemu": lambda: float(run(cmd).stdout.rsplit("Run completed in ", 1)[1]
                                      .split()[0]),
                "qcow2fast": lambda: qf_loop(qcow2, offsets, write, depth),
                "qcow2fast (threads)": lambda: qf_loop(qcow2, offsets, write, depth, True),
                "fio": lambda: fio_loop(fio_file, a.count, write, depth)}
            t = {e: [] for e in engines}
            for r in range(a.runs):
                for e, timed in engines.items():
                    # Every engine starts with no dirty pages: the earlier
                    # runs' overwrites are not written back during this one.
                    os.sync()
                    t[e].append(timed())
            iops = {e: a.count / summarise(s)["median"] for e, s in t.items()}
            row = {"op": op, "depth": depth, "samples": t, "iops": iops,
                   "load": os.getloadavg()[0],
                   "vs_qemu": ratio_info(t["qemu"], t["qcow2fast"]),
                   "vs_fio": ratio_info(t["fio"], t["qcow2fast"])}
            log(f"  {op} depth {depth}: " + ", ".join(f"{e} {v:,.0f}" for e, v in iops.items())
                + f" IOPS (load {row['load']:.1f})")
            results.append(row)
    # The raw copy gets the overwrites qemu and qcow2fast made: the image must equal it.
    fd = os.open(raw, os.O_WRONLY)
    try:
        data = bytes([WRITE_PATTERN]) * REQ
        for off in offsets:
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)
    if run([a.qemu_img, "compare", "-f", "qcow2", "-F", "raw", qcow2, raw],
           check=False).returncode:
        raise BenchError("the overwritten qcow2 image and raw file differ")
    return results


def report(results, out=sys.stdout):
    print("\nCached 4 KiB requests, IOPS (medians):\n", file=out)
    d1 = {r["op"]: r["iops"]["qcow2fast"] for r in results if r["depth"] == 1}
    md_table(["op", "depth", "qemu-img bench", "qcow2fast", "qcow2fast (threads)", "fio",
              "vs qemu", "vs own depth 1", "vs fio", "load"],
             [[r["op"], r["depth"], f"{r['iops']['qemu']:,.0f}", f"{r['iops']['qcow2fast']:,.0f}",
               f"{r['iops']['qcow2fast (threads)']:,.0f}", f"{r['iops']['fio']:,.0f}",
               fmt_ratio(r["vs_qemu"]), f"{r['iops']['qcow2fast'] / d1[r['op']]:.2f}x",
               fmt_ratio(r["vs_fio"]), f"{r['load']:.1f}"]
              for r in results], out)


def plot(results, path):
    fig, axes = panels(2)
    for ax, op in zip(axes, ("read", "overwrite")):
        rows = [r for r in results if r["op"] == op]
        for e, style in zip(ENGINES, ("o-", "s-", "x:", "^--")):
            ax.plot([r["depth"] for r in rows], [r["iops"][e] for r in rows], style,
                    label={"qemu": "qemu-img bench -i io_uring",
                           "fio": "fio io_uring (raw file)"}.get(e, e))
        ax.set_ylim(bottom=0)
        ax.set_xscale("log", base=2)
        depths = [r["depth"] for r in rows]
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_title(f"cached 4 KiB {op}s")
        ax.set_xlabel("queue depth")
        ax.set_ylabel("requests / s")
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    save_figure(fig, path)


def main(argv=None):
    p = bench_parser("python -m benchmarks.threads_bench", __doc__,
                     "256 MiB image, 20000 requests, 1 run")
    a = parse_mode(p, argv, MODES)
    meta = {"size": a.size, "count": a.count, "runs": a.runs}
    return scenario_main(a, "threads-bench", 3 * a.size + 64 * MiB, collect, report, plot, meta,
                         aio=True)


if __name__ == "__main__":
    sys.exit(main())
