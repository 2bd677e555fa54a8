"""``qcow2fast commit`` / ``rebase`` beside ``qemu-img commit`` / ``rebase``
on a chain of realistic layers, in one run.

    python -m benchmarks.commit_bench [--quick] [--size SIZE] [--runs N] [--json OUT] [--tmpdir DIR]

The chain (made once, in a scratch directory deleted after): ``base`` a
2 GiB image full of data (1 GiB with --quick, SIZE with --size); ``mid`` and ``top``
overlays written as a guest writes, in scattered runs of 4 KiB to 1 MiB
(``mid`` about 10% of the disk, ``top`` about 5%, each with a few zeroed
ranges); ``other``, a sibling of ``mid`` on the same base (5%).

Operations, each on a fresh copy of the images it writes (hard links to
the others; the copy is not timed, and is synced first):

- ``commit``: top into mid, top emptied (``commit top``);
- ``commit -b base``: mid and top into base (``commit -b base top``);
- ``rebase onto base``: top from mid onto base, mid being part of the old
  chain (qemu's "prefix chain" case);
- ``rebase onto sibling``: top from mid onto ``other`` (both on base);
- ``rebase -b ""``: top made to stand alone.

Each is run as the user would (process start-up included; qcow2fast
costs about 0.1-0.2 s more there), alternating which tool goes first;
the package's bytecode is compiled first, as an installed package's is
(where PYTHONDONTWRITEBYTECODE is set, each command would otherwise
compile every module it imports);
reported: median wall time, the speed ratio qemu/qcow2fast (>1:
qcow2fast faster) with the range of the per-run ratios, and the median
CPU time (user+sys) of each command; and the qcow2fast operation as a
library call timed inside one process (what an embedding program pays),
with its ratio to the qemu-img command, and its CPU time (all threads:
the figure to set beside qemu-img's CPU when the machine is loaded).
Every run's result is checked: ``qemu-img compare`` of the top with
qemu's result.
"""

import os
import shutil
import subprocess
import sys
import time

from .common import (ROOT, GiB, BenchError, bench_parser, human, log, parse_size,
                     qcow2fast_command, ratio_info, run, scenario_main, summarise)

SIZES = {"full": {"size": 2 * GiB, "runs": 5}, "quick": {"size": 1 * GiB, "runs": 3}}
REPO = ROOT        # children import qcow2fast from where this one did

# The chain, written through qcow2fast's API in a child (this process stays
# small).  The base is written whole; overlays get scattered guest writes.
MAKE_CHAIN = """
import os, random, sys, qcow2fast
d, size = sys.argv[1], int(sys.argv[2])
chunk = os.urandom(64 << 20)
qcow2fast.create(d + "/base.qcow2", size)
with qcow2fast.open(d + "/base.qcow2", "r+") as img:
    for off in range(0, size, len(chunk)):
        img.write(off, chunk[:min(len(chunk), size - off)])
for name, share, seed in (("mid", 0.10, 1), ("top", 0.05, 2), ("other", 0.05, 3)):
    below = "mid.qcow2" if name == "top" else "base.qcow2"
    qcow2fast.create(f"{d}/{name}.qcow2", None, backing_file=below, backing_format="qcow2")
    rng = random.Random(seed)
    with qcow2fast.open(f"{d}/{name}.qcow2", "r+") as img:
        done = 0
        while done < share * size:
            n = rng.choice((4096, 65536, 262144, 1 << 20))
            off = rng.randrange(0, size - n) // 4096 * 4096
            if rng.random() < 0.05:
                img.write_zeroes(off, n)
            else:
                p = rng.randrange(0, len(chunk) - n)
                img.write(off, chunk[p:p + n])
            done += n
"""

# The same operation as a library call, timed inside one process (no
# start-up, no imports): what an embedding program pays.
LIBRARY_CALL = """
import sys, time, qcow2fast
import qcow2fast.ops.commit, qcow2fast.ops.rebase
command, args = sys.argv[1], sys.argv[2:]
t, c = time.perf_counter(), time.process_time()
if command == "commit":
    base = args[args.index("-b") + 1] if "-b" in args else None
    qcow2fast.commit(args[-1], base=base, drop=base is not None)
else:
    b = args[args.index("-b") + 1]
    qcow2fast.rebase(args[-1], b, backing_fmt="qcow2" if b else None)
print(time.perf_counter() - t, time.process_time() - c)
"""

# (label, command, arguments, the images it writes)
OPERATIONS = [
    ("commit", "commit", ["-q", "top.qcow2"], ("mid", "top")),
    ("commit -b base", "commit", ["-q", "-b", "base.qcow2", "top.qcow2"], ("base",)),
    ("rebase onto base", "rebase", ["-q", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
     ("top",)),
    ("rebase onto sibling", "rebase", ["-q", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
     ("top",)),
    ('rebase -b ""', "rebase", ["-q", "-b", "", "top.qcow2"], ("top",)),
]
IMAGES = ("base", "mid", "top", "other")


def timed(cmd, cwd):
    """(wall s, CPU s) of ``cmd`` run in ``cwd``, from its own rusage."""
    env = dict(os.environ, PYTHONPATH=REPO)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    err = p.stderr.read()
    p.stderr.close()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise BenchError(f"{' '.join(cmd)} failed: {err.decode(errors='replace')}")
    return wall, ru.ru_utime + ru.ru_stime


def fresh_copy(master, d, written):
    """The chain in ``d``: a copy of each image the operation writes, hard
    links to the others (which nothing writes)."""
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for name in IMAGES:
        src, dst = os.path.join(master, f"{name}.qcow2"), os.path.join(d, f"{name}.qcow2")
        (shutil.copyfile if name in written else os.link)(src, dst)
    os.sync()


def collect(a, tmpdir):
    master = os.path.join(tmpdir, "master")
    os.makedirs(master)
    log(f"  making the chain: {human(a.size)} base, overlays mid 10%, top 5%, other 5%")
    run([sys.executable, "-c", MAKE_CHAIN, master, str(a.size)])
    tools = {"qemu-img": [a.qemu_img], "qcow2fast": qcow2fast_command()}
    results = []
    for label, command, argv, written in OPERATIONS:
        samples = {t: [] for t in tools}
        cpu = {t: [] for t in tools}
        library, library_cpu = [], []
        for r in range(a.runs):
            order = list(tools) if r % 2 == 0 else list(reversed(tools))
            for t in order:
                fresh_copy(master, os.path.join(tmpdir, t), written)
                wall, used = timed(tools[t] + [command] + argv, os.path.join(tmpdir, t))
                samples[t].append(wall)
                cpu[t].append(used)
            d = os.path.join(tmpdir, "library")
            fresh_copy(master, d, written)
            wall, used = map(float, subprocess.run(
                [sys.executable, "-c", LIBRARY_CALL, command, *argv], cwd=d, check=True,
                env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                text=True).stdout.split())
            library.append(wall)
            library_cpu.append(used)
            p = subprocess.run([a.qemu_img, "compare", "-q",
                                os.path.join(tmpdir, "qemu-img", "top.qcow2"),
                                os.path.join(tmpdir, "qcow2fast", "top.qcow2")])
            if p.returncode != 0:
                raise BenchError(f"{label}: the results differ (qemu-img compare {p.returncode})")
        log(f"  {label}: qemu-img {summarise(samples['qemu-img'])['median']:.2f} s, "
            f"qcow2fast {summarise(samples['qcow2fast'])['median']:.2f} s")
        results.append({"operation": label, "samples": samples, "cpu": cpu, "library": library,
                        "library_cpu": library_cpu,
                        "library_ratio": ratio_info(samples["qemu-img"], library),
                        "ratio": ratio_info(samples["qemu-img"], samples["qcow2fast"])})
    return results


def report(results, out=sys.stdout):
    print("\n| operation | qemu-img | qcow2fast | speed ratio (range) | CPU qemu / ours | "
          "library call | ratio | library CPU |", file=out)
    print("|---|---|---|---|---|---|---|---|", file=out)
    for r in results:
        q, f = (summarise(r["samples"][t])["median"] for t in ("qemu-img", "qcow2fast"))
        cq, cf = (summarise(r["cpu"][t])["median"] for t in ("qemu-img", "qcow2fast"))
        ratio = r["ratio"]
        print(f"| {r['operation']} | {q:.2f} s | {f:.2f} s | {ratio['ratio']:.2f}x "
              f"({ratio['min']:.2f}-{ratio['max']:.2f}) | {cq:.2f} / {cf:.2f} s | "
              f"{summarise(r['library'])['median']:.2f} s | {r['library_ratio']['ratio']:.2f}x | "
              f"{summarise(r.get('library_cpu') or [0])['median']:.2f} s |", file=out)


def main(argv=None):
    p = bench_parser("python -m benchmarks.commit_bench", __doc__, "1 GiB base, 3 runs")
    p.add_argument("--size", type=parse_size, help="the base's size (default 2G, --quick 1G)")
    a = p.parse_args(argv)
    mode = SIZES["quick" if a.quick else "full"]
    a.size, a.runs = a.size or mode["size"], a.runs or mode["runs"]
    return scenario_main(a, "commit", 6 * a.size, collect, report,
                         meta={"size": a.size, "runs": a.runs})


if __name__ == "__main__":
    sys.exit(main())
