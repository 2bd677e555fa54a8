"""qcow2fast convert versus qemu-img convert (and cp) on a real filesystem image.

    python -m benchmarks.convert_bench [--quick] [--runs N] [--json OUT] [--plot PNG]

The source is an ext4 image made once with ``mkfs.ext4 -d`` from system
directories (hard-linked into a staging tree), with free space left so that
sparseness matters, and cached (``--cache``).  Then, side by side in one run
and on the same page-cached source: raw->qcow2, qcow2->raw (both also with
``-t none``: O_DIRECT output), raw->qcow2 -c (zlib) and raw->qcow2 -c with
compression_type=zstd, for qcow2fast and qemu-img convert, plus ``cp
--sparse=always`` of the raw image as the reference for the uncompressed
cases.  Each figure is the median of
``--runs`` runs: wall time, CPU time (user+sys of the child process, from
getrusage(RUSAGE_CHILDREN)), output size.  Before every run: the previous
output deleted, sync, and ``--settle`` seconds of rest (see bench()), the
tools in rotating order.  Every output is verified once
with qemu-img compare (and check for qcow2).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from .common import (ROOT, BenchError, GiB, MiB, choose_tmpdir, git_revision, log,
                     qcow2fast_command, run, timed_command)
from .report import bar_groups, panels, save_figure

REPO = ROOT        # children import qcow2fast from where this one did
# (image size, directories copied into it): full about 2.2 GiB of files in
# 3 GiB, quick about 190 MiB in 384 MiB.
SOURCES = {
    "full": (3 * GiB, ["/usr/share", "/usr/lib/x86_64-linux-gnu", "/usr/lib/jvm", "/usr/bin"]),
    "quick": (384 * MiB, ["/usr/include", "/usr/lib/python3.11"]),
}
CASES = [  # name, source format, output format, extra qcow2fast/qemu-img options
    ("raw->qcow2", "raw", "qcow2", []),
    ("qcow2->raw", "qcow2", "raw", []),
    # O_DIRECT output (-t none): no new page cache, so the cost of fresh
    # pages on this VM (see bench()) is out of the picture.
    ("raw->qcow2 -t none", "raw", "qcow2", ["-t", "none"]),
    ("qcow2->raw -t none", "qcow2", "raw", ["-t", "none"]),
    ("raw->qcow2 -c zlib", "raw", "qcow2", ["-c"]),
    ("raw->qcow2 -c zstd", "raw", "qcow2", ["-c", "-o", "compression_type=zstd"]),
]
# qemu-img's fastest comparable settings: 8 coroutines (its default, made
# explicit) and out-of-order writes.
QEMU_FLAGS = ["-m", "8", "-W"]


def build_source(cache, mode):
    size, dirs = SOURCES[mode]
    raw = os.path.join(cache, f"ext4-{mode}.raw")
    qcow2 = raw[:-4] + ".qcow2"
    if not os.path.exists(raw):
        dirs = [d for d in dirs if os.path.isdir(d)]
        if not dirs:
            raise BenchError("none of the source directories exist: " + ", ".join(SOURCES[mode][1]))
        stage = os.path.join(cache, "stage")
        shutil.rmtree(stage, ignore_errors=True)
        os.makedirs(stage)
        for d in dirs:
            dst = os.path.join(stage, d.strip("/").replace("/", "_"))
            # Hard links: no copy of the data when the cache is on the same filesystem.
            if subprocess.run(["cp", "-al", d, dst], capture_output=True).returncode != 0:
                shutil.rmtree(dst, ignore_errors=True)
                run(["cp", "-a", d, dst], check=False)
        log(f"building {raw} ({size // MiB} MiB ext4 from {', '.join(dirs)}) ...")
        tmp = raw + ".tmp"
        with open(tmp, "wb") as f:
            f.truncate(size)
        p = subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", stage, tmp],
                           capture_output=True, text=True)
        shutil.rmtree(stage, ignore_errors=True)
        if p.returncode != 0 and "No space left" in p.stderr + p.stdout:
            log("the directories do not fit; keeping what mkfs wrote")
        elif p.returncode != 0:
            os.unlink(tmp)
            raise BenchError(f"mkfs.ext4 failed: {p.stderr.strip()}")
        os.replace(tmp, raw)
    if not os.path.exists(qcow2):
        run(["qemu-img", "convert", "-O", "qcow2", raw, qcow2])
    return raw, qcow2


def commands(case, src, raw, out, threads):
    name, sfmt, ofmt, extra = case
    qf = [*qcow2fast_command(), "convert", "-f", sfmt, "-O", ofmt, *extra]
    if threads:
        qf += ["-m", str(threads)]
    tools = {"qcow2fast": qf + [src, out],
             "qemu-img": ["qemu-img", "convert", *QEMU_FLAGS, "-f", sfmt, "-O", ofmt, *extra,
                          src, out]}
    if "-c" not in extra:           # the reference: the same guest bytes, copied sparse
        tools["cp"] = ["cp", "--sparse=always", raw, out]
    return tools


def verify(out, ofmt, raw):
    if ofmt == "qcow2":
        run(["qemu-img", "check", "-q", out])
    run(["qemu-img", "compare", "-q", "-f", ofmt, "-F", "raw", out, raw])


def bench(args):
    mode = "quick" if args.quick else "full"
    os.makedirs(args.cache, exist_ok=True)
    raw, qcow2 = build_source(args.cache, mode)
    size = os.path.getsize(raw)
    tmpdir, fstype = choose_tmpdir(args.tmpdir, 2 * size, prefix="qcow2fast-convert-bench-")
    for path in (raw, qcow2):                        # page-cache the sources
        with open(path, "rb") as f:
            while f.readinto(bytearray(16 << 20)):
                pass
    results = []
    try:
        for case in CASES:
            name, sfmt, ofmt, extra = case
            if args.only and name not in args.only:
                continue
            src = raw if sfmt == "raw" else qcow2
            out = os.path.join(tmpdir, "out." + ofmt)
            tools = commands(case, src, raw, out, args.threads)
            entry = {"case": name, "tools": {t: {"samples": [], "cmd": c}
                                             for t, c in tools.items()}}
            # Interleaved, each run after a sync with no output file, and the
            # order rotated from run to run: on these VMs a run is slower
            # right after some tools (measured: 2x after cp), so every tool
            # gets every predecessor.
            names = list(tools)
            for i in range(args.runs):
                for tool in names[i % len(names):] + names[:i % len(names)]:
                    cmd = tools[tool]
                    if os.path.exists(out):
                        os.unlink(out)
                    os.sync()
                    # The guest returns freed pages to the host (virtio-balloon
                    # free page reporting, a couple of seconds after they are
                    # freed); the next run's page cache then faults them back
                    # in at a cost that swings 0.6-3 s per 2 GiB with timing.
                    # Waiting until the reporting is done gives every run the
                    # same (cold) memory.
                    time.sleep(args.settle)
                    wall, cpu = timed_command(cmd)
                    st = os.stat(out)
                    entry["tools"][tool]["samples"].append(
                        {"wall": wall, "cpu": cpu, "size": st.st_size,
                         "allocated": st.st_blocks * 512})
                    if i == 0:
                        verify(out, ofmt if tool != "cp" else "raw", raw)
            os.unlink(out)
            for tool in tools:
                samples = entry["tools"][tool]["samples"]
                log(f"{name:<20} {tool:<10} median {med(samples, 'wall'):7.2f} s, min "
                    f"{min(x['wall'] for x in samples):7.2f} s")
            results.append(entry)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return {"mode": mode, "source": raw, "source_size": size,
            "source_allocated": os.stat(raw).st_blocks * 512, "fstype": fstype,
            "runs": args.runs, "cpus": os.cpu_count(), "qemu_flags": QEMU_FLAGS,
            "settle_s": args.settle,
            "results": results}


def med(samples, key):
    return statistics.median(s[key] for s in samples)


def report(doc, out=sys.stdout):
    print(f"\nqcow2fast convert_bench ({doc['mode']}): source {doc['source']} "
          f"({doc['source_size'] / GiB:.2f} GiB, {doc['source_allocated'] / GiB:.2f} GiB "
          f"allocated), {doc['cpus']} CPUs, median of {doc['runs']} runs, qemu-img convert "
          f"{' '.join(doc['qemu_flags'])}", file=out)
    head = (f"{'case':<20} {'tool':<10} {'wall s':>7} {'min s':>7} {'cpu s':>7} {'size MiB':>9} "
            f"{'alloc MiB':>9}  {'speed vs qemu':>13} {'size vs qemu':>12} {'wall vs cp':>10}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for e in doc["results"]:
        t = e["tools"]
        q = t.get("qemu-img")
        for tool, d in t.items():
            s = d["samples"]
            ratio = size_ratio = vs_cp = ""
            if tool == "qcow2fast" and q:
                ratio = f"{med(q['samples'], 'wall') / med(s, 'wall'):.2f}x"
                size_ratio = f"{med(s, 'size') / med(q['samples'], 'size'):.3f}"
            if tool == "qcow2fast" and "cp" in t:
                vs_cp = f"{med(s, 'wall') / med(t['cp']['samples'], 'wall'):.2f}"
            print(f"{e['case'] if tool == next(iter(t)) else '':<20} {tool:<10} "
                  f"{med(s, 'wall'):7.2f} {min(x['wall'] for x in s):7.2f} {med(s, 'cpu'):7.2f} "
                  f"{med(s, 'size') / MiB:9.1f} "
                  f"{med(s, 'allocated') / MiB:9.1f}  {ratio:>13} {size_ratio:>12} "
                  f"{vs_cp:>10}", file=out)
    print("speed vs qemu: qemu-img wall / qcow2fast wall (>1: qcow2fast faster); size vs "
          "qemu: qcow2fast output / qemu-img output; wall vs cp: qcow2fast / cp "
          "--sparse=always of the raw image (1 = as fast as cp).", file=out)


def plot(doc, path):
    """Wall time, CPU time and output size on disk per case (median, min-max
    over the runs): qcow2fast, qemu-img and cp."""
    cases = [e["case"] for e in doc["results"]]
    fig, axes = panels(3, 4.6, 4.2)
    for ax, key, unit, title, scale in (
            (axes[0], "wall", "wall time (s)", "convert: wall time", 1),
            (axes[1], "cpu", "CPU time, user + sys (s)", "convert: CPU time", 1),
            (axes[2], "allocated", "output allocated on disk (MiB)", "convert: output size",
             1 / MiB)):
        series = [(label, [[x[key] * scale for x in e["tools"][tool]["samples"]]
                           if tool in e["tools"] else [] for e in doc["results"]])
                  for tool, label in (("qcow2fast", "qcow2fast convert"),
                                      ("qemu-img", "qemu-img convert"),
                                      ("cp", "cp --sparse=always"))]
        bar_groups(ax, [c.replace("->", "→\n").replace(" -", "\n-") for c in cases], series,
                   unit, title,
                   log="auto")
    axes[2].axhline(doc["source_allocated"] / MiB, color="grey", linestyle="--", linewidth=1,
                    label="source raw image, allocated")
    axes[2].margins(y=0.1)
    fig.suptitle(f"{doc['source_size'] / MiB:.0f} MiB ext4 image, {doc['cpus']} CPUs, "
                 f"median of {doc['runs']} runs", fontsize="medium")
    save_figure(fig, path, legend=axes[2])


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.convert_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="384 MiB source instead of 3 GiB")
    p.add_argument("--runs", type=int, help="runs per figure (default 5, --quick 2)")
    p.add_argument("--threads", type=int, help="qcow2fast -m (default: all CPUs)")
    p.add_argument("--cache", default="/var/tmp/qcow2fast-convert-bench",
                   help="where the source images are built once and kept")
    p.add_argument("--tmpdir", help="directory for the outputs")
    p.add_argument("--json", metavar="OUT", help="write every sample to this JSON file")
    p.add_argument("--plot", metavar="PNG", help="write the plot here")
    p.add_argument("--only", action="append", choices=[c[0] for c in CASES],
                   help="run only this case (repeatable)")
    p.add_argument("--settle", type=float, metavar="S",
                   help="seconds to wait after the sync before each run (default 5, "
                        "--quick 0): see bench()")
    a = p.parse_args(argv)
    a.runs = a.runs or (2 if a.quick else 5)
    a.settle = a.settle if a.settle is not None else (0 if a.quick else 5)
    return a


def main(argv=None):
    args = parse_args(argv)
    for tool in ("qemu-img", "mkfs.ext4"):
        if not shutil.which(tool):
            log(f"{tool} not found")
            return 1
    try:
        doc = bench(args)
    except BenchError as e:
        log(f"convert_bench: {e}")
        return 1
    doc["revision"], doc["dirty"] = git_revision(REPO)
    report(doc)
    if args.plot:
        plot(doc, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
