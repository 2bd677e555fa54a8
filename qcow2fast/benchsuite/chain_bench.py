"""Long backing chains: 4 KiB reads at chain depths 1 to 1000, qcow2fast
beside qemu-img bench, IOPS and peak memory.

    python -m benchmarks.chain_bench [--quick] [--runs N] [--queue-depth Q]
                                     [--json OUT] [--plot PNG]

The experiment of "Virtual Disk Snapshot Management at Scale" (arXiv
2205.06842): a base image fully written (1 GiB; 256 MiB with --quick), then
overlays each holding one 64 KiB cluster of its own (made as qemu makes
them: tests/helpers/chain_util.py copies a qemu-made overlay), the whole
chain page-cached.  At each depth (images in the chain: 1 is the base
alone) both engines read the top: ``qcow2fast bench`` and ``qemu-img bench
-i io_uring`` (the same options: -d 1 -s 4k, a scattering step of 7919 * 4
KiB, -t writeback, default caches; ``--queue-depth Q``: -d Q, requests in
flight through each engine's queue), each its own process, the time being
the engine's own "Run completed in" (the request loop, cache warm-up
included; opening the chain is not in it, and is reported beside it as the
process's wall time).  Peak RSS is each process's (wait4).  qemu gets
fewer requests at depth (it runs at a few hundred IOPS there); each
engine's count is in the JSON.  Checked: at every depth up to 256,
qcow2fast reads the bytes qemu-io reads at sampled offsets (deeper, qemu
takes minutes; tests/interop/test_chain.py compares a 1000-deep chain).
"""

import os
import re
import shutil
import subprocess
import sys
import time

from .common import (BenchError, bench_parser, human, log, parse_mode, qcow2fast_command,
                     run, scenario_main, summarise)
from .io_config import RUN_RE
from .report import md_table, panels, save_figure

STEP = 7919 * 4096
MODES = {"full": {"size": 1 << 30, "count": 400_000, "runs": 3,
                  "depths": (1, 16, 64, 256, 1000)},
         "quick": {"size": 256 << 20, "count": 100_000, "runs": 2, "depths": (1, 16, 64)}}
QEMU_BUDGET = 150_000        # qemu's requests at depth d: about QEMU_BUDGET / d (at least 200)


def bench_one(a, engine, path, count):
    common = ["-c", str(count), "-d", str(a.queue_depth), "-s", "4096", "-S", str(STEP),
              "-t", "writeback"]
    if engine == "qemu":
        cmd = [a.qemu_img, "bench", "-f", "qcow2", "-i", a.aio, *common, path]
    else:
        cmd = [*qcow2fast_command(), "bench", *common, path]
    # Peak RSS by GNU time (a small parent: a child forked from this Python
    # would inherit its high-water mark).
    rss_file = os.path.join(a.tmpdir_used, "rss.txt")
    t0 = time.perf_counter()
    p = subprocess.run([a.gnu_time, "-f", "%M", "-o", rss_file, *cmd], capture_output=True,
                       text=True)
    wall = time.perf_counter() - t0
    out = p.stdout
    if p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed:\n{out}{p.stderr}")
    with open(rss_file) as f:
        rss = int(f.read().split()[-1]) * 1024
    m = RUN_RE.search(out)
    if not m:
        raise BenchError(f"no 'Run completed' in the output of {' '.join(cmd)}:\n{out}")
    loop = float(m[1])
    return {"count": count, "loop": loop, "iops": count / loop, "wall": wall,
            "rss": rss, "output": out.strip().splitlines()[-1]}


def build_chain(a, tmpdir):
    from .chain_util import layer_name, make_deep_chain
    t0 = time.perf_counter()
    make_deep_chain(tmpdir, max(a.depths) - 1, size=a.size, fill_base=False)
    base = os.path.join(tmpdir, layer_name(0))
    chunk = 1 << 20
    run([a.qemu_img, "bench", "-f", "qcow2", "-w", "-c", str(a.size // chunk), "-d", "4",
         "-s", str(chunk), "-S", str(chunk), "--pattern=90", "-t", "writeback",
         "-i", a.aio, base])
    log(f"  chain of {max(a.depths)} images on a {human(a.size)} base made in "
        f"{time.perf_counter() - t0:.1f} s")
    return {d: os.path.join(tmpdir, layer_name(d - 1)) for d in a.depths}


def warm(paths):
    buf = bytearray(4 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def verify(a, tops):
    """qcow2fast reads what qemu reads at sampled offsets of every depth's top."""
    import qcow2fast
    out = []
    for d, top in tops.items():
        offsets = [(i * STEP * 37) % a.size for i in range(8)]
        cmds = []
        for off in offsets:
            cmds += ["-c", f"read -v {off} 512"]
        if d > 256:
            out.append(f"depth {d}: qemu-io check skipped (minutes at this depth); "
                       "see tests/interop/test_chain.py")
            continue
        q = subprocess.run(["qemu-io", "-r", "-f", "qcow2", *cmds, top], capture_output=True,
                           text=True, check=True).stdout
        got = b""
        for line in q.splitlines():
            if re.match(r"^[0-9a-f]{8}:", line):
                got += bytes.fromhex("".join(line.split(":")[1].split()[:16]))
        with qcow2fast.open(top) as img:
            mine = b"".join(img.read(off, 512) for off in offsets)
        if mine != got:
            raise BenchError(f"depth {d}: qcow2fast and qemu-io read different bytes")
        out.append(f"depth {d}: 8 sampled reads equal qemu-io's")
    return out


def collect(a, tmpdir):
    a.tmpdir_used = tmpdir
    a.gnu_time = shutil.which("time") or "/usr/bin/time"
    if not os.access(a.gnu_time, os.X_OK):
        raise BenchError("GNU time (/usr/bin/time, Debian package time) is needed for peak RSS")
    tops = build_chain(a, tmpdir)
    warm(os.path.join(tmpdir, f) for f in os.listdir(tmpdir))
    rows = []
    for d in a.depths:
        qcount = min(a.count, max(200, QEMU_BUDGET // d))
        samples = {"qemu": [], "qcow2fast": []}
        for r in range(a.runs):
            order = ("qemu", "qcow2fast") if r % 2 else ("qcow2fast", "qemu")
            for e in order:
                samples[e].append(bench_one(a, e, tops[d], qcount if e == "qemu" else a.count))
        row = {"depth": d, "samples": samples}
        for e, s in samples.items():
            row[e] = {"iops": summarise([x["iops"] for x in s])["median"],
                      "rss": summarise([x["rss"] for x in s])["median"],
                      "wall": summarise([x["wall"] for x in s])["median"]}
        rows.append(row)
        log(f"  depth {d}: qemu {row['qemu']['iops']:,.0f} IOPS, "
            f"{row['qemu']['rss'] / 2**20:.0f} MiB; qcow2fast {row['qcow2fast']['iops']:,.0f} "
            f"IOPS, {row['qcow2fast']['rss'] / 2**20:.0f} MiB")
    return {"rows": rows, "verify": verify(a, tops), "size": a.size, "step": STEP,
            "queue_depth": a.queue_depth}


def report(res, out=sys.stdout):
    rows = res["rows"]
    base = {e: rows[0][e] for e in ("qemu", "qcow2fast")}
    print(f"\n4 KiB reads, queue depth {res.get('queue_depth', 1)}, page-cached chain "
          "(median of runs; RSS = peak):\n", file=out)
    md_table(["depth", "qemu-img IOPS", "qcow2fast IOPS", "vs qemu", "vs own depth 1",
              "qemu RSS", "qcow2fast RSS", "open+run wall qemu / ours"],
             [[r["depth"], f"{r['qemu']['iops']:,.0f}", f"{r['qcow2fast']['iops']:,.0f}",
               f"{r['qcow2fast']['iops'] / r['qemu']['iops']:.1f}x",
               f"{r['qcow2fast']['iops'] / base['qcow2fast']['iops']:.2f}",
               f"{r['qemu']['rss'] / 2**20:.0f} MiB", f"{r['qcow2fast']['rss'] / 2**20:.0f} MiB",
               f"{r['qemu']['wall']:.1f} / {r['qcow2fast']['wall']:.1f} s"] for r in rows], out)
    if len(rows) > 1:
        last = rows[-1]
        per = {e: (last[e]["rss"] - base[e]["rss"]) / (last["depth"] - 1) / 1024
               for e in ("qemu", "qcow2fast")}
        print(f"\nMemory per added layer (depth 1 to {last['depth']}): qemu "
              f"{per['qemu']:.0f} KiB, qcow2fast {per['qcow2fast']:.0f} KiB", file=out)
    print("\n" + "\n".join(f"- {v}" for v in res["verify"]), file=out)


def plot(res, path):
    rows = res["rows"]
    fig, (ax1, ax2) = panels(2)
    x = [r["depth"] for r in rows]
    for e, marker, label in (("qemu", "o-", "qemu-img bench"), ("qcow2fast", "s-", "qcow2fast")):
        ax1.plot(x, [r[e]["iops"] for r in rows], marker, label=label)
        ax2.plot(x, [r[e]["rss"] / 2**20 for r in rows], marker, label=label)
    for ax, title, ylabel in ((ax1, "4 KiB reads", "requests / s"),
                              (ax2, "peak memory", "RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("chain depth (images)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path, legend=ax1)


def main(argv=None):
    p = bench_parser("python -m benchmarks.chain_bench", __doc__,
                     "256 MiB base, depths 1, 16 and 64, 2 runs (about a minute)")
    p.add_argument("--depths", help="comma-separated chain depths (default 1,16,64,256,1000)")
    p.add_argument("--queue-depth", type=int, default=1, metavar="Q",
                   help="requests in flight (bench -d Q), default 1")
    a = parse_mode(p, argv, MODES)
    a.depths = (tuple(int(x) for x in a.depths.split(",")) if a.depths
                else MODES["quick" if a.quick else "full"]["depths"])
    need = a.size * 2 + max(a.depths) * (1 << 20)
    return scenario_main(a, "chain", need, collect, report, plot,
                         meta={"mode": "quick" if a.quick else "full"}, aio=True)


if __name__ == "__main__":
    sys.exit(main())
