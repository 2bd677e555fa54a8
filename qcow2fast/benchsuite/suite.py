"""The benchmark suite: every scenario, qcow2fast beside QEMU, in one run.

    qcow2fast bench-suite [--quick] [--only NAME ...] [--out DIR]
    python -m benchmarks [--quick] [--only NAME ...] [--out DIR]     (from a clone)

Each scenario is its own module of this package (runnable alone, see
benchmarks/README.md); the suite runs them one after the other in child
processes and writes, in DIR (default: benchmarks/results/suite-<time> in
a clone, ./qcow2fast-bench/suite-<time> otherwise):

- ``<scenario>.json``: every sample the scenario took;
- ``<scenario>.png``: its plot (the scenarios flagged as drawing one: all);
- ``report.md``: each scenario's tables (medians, ratios, ranges).

Exit status 1 if a scenario failed (its verification included); the
others still run.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import time

from .common import log

# (name, module, what it measures, draws a plot)
SCENARIOS = [
    ("cached-io", "benchmarks.io_bench",
     "Cached reads, overwrites and allocating writes at queue depth 1, with a raw-file "
     "pread/pwrite loop as the physical limit.", True),
    ("threads", "benchmarks.threads_bench",
     "Cached reads and overwrites at queue depths 1 to 32 (batches through the batched "
     "path, and threads sharing the image) beside qemu-img bench and fio io_uring.", True),
    ("l2-cache", "benchmarks.l2cache_bench",
     "4 KiB random-read IOPS against L2 cache size and cache entry size.", True),
    ("cluster-size", "benchmarks.clustersize_bench",
     "Sequential and random 4 KiB reads and writes, image growth and metadata size for "
     "cluster sizes 4 KiB to 2 MiB.", True),
    ("subclusters", "benchmarks.subcluster_bench",
     "Allocating 4 KiB writes over a populated backing file: traditional versus extended "
     "L2 entries.", True),
    ("jitter", "benchmarks.jitter_bench",
     "Latency of a steady stream of small allocating writes under each cache mode, lazy "
     "refcounts off and on.", True),
    ("check", "benchmarks.check_bench",
     "qcow2fast check beside qemu-img check on large images.", True),
    ("startup", "benchmarks.startup_bench",
     "Short commands on a small image (info, check, map, snapshot, resize, amend, commit, "
     "rebase) beside qemu-img: start-up, with the interpreter's floors.", False),
    ("convert", "benchmarks.convert_bench",
     "Conversion of an ext4 image of system files: raw to qcow2, qcow2 to raw, zlib and zstd "
     "compression, beside qemu-img convert and cp.", True),
    ("nbd", "benchmarks.nbd_bench",
     "qcow2fast serve beside qemu-nbd: nbdcopy and qemu-img bench over NBD.", True),
    ("chain", "benchmarks.chain_bench",
     "4 KiB reads through backing chains 1 to 1000 images deep: IOPS and peak memory.", True),
    ("commit", "benchmarks.commit_bench",
     "commit and rebase on a chain of realistic layers beside qemu-img commit and rebase, as "
     "commands and as library calls.", False),
]
NAMES = [s[0] for s in SCENARIOS]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLONE = os.path.join(ROOT, "benchmarks")     # a clone's thin entry (benchmarks/__init__.py)


def scenario_module(module):
    """The module to run for a SCENARIOS entry ``benchmarks.NAME``: this
    package's NAME, else (a scenario not moved into the package yet) the
    clone's benchmarks.NAME; None when neither is there."""
    leaf = module.rpartition(".")[2]
    if importlib.util.find_spec(f"{__package__}.{leaf}") is not None:
        return f"{__package__}.{leaf}"
    if os.path.isfile(os.path.join(CLONE, f"{leaf}.py")):
        return module
    return None


def run_scenario(name, module, quick, out_dir):
    """Run one scenario module; returns (exit status, its stdout, seconds)."""
    found = scenario_module(module)
    if found is None:
        log(f"{name}: {module} is not installed (not in {__package__})")
        return 1, "", 0.0
    cmd = [sys.executable, "-m", found, "--json", os.path.join(out_dir, f"{name}.json")]
    if quick:
        cmd.append("--quick")
    if dict((s[0], s[3]) for s in SCENARIOS)[name]:
        cmd += ["--plot", os.path.join(out_dir, f"{name}.png")]
    env = dict(os.environ)       # the scenarios import qcow2fast from here, whatever the cwd
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    return p.returncode, p.stdout, time.perf_counter() - t0


def main(argv=None, prog="python -m benchmarks"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every scenario's quick mode")
    p.add_argument("--only", action="append", choices=NAMES, help="run only this scenario")
    p.add_argument("--out", help="directory for the results")
    a = p.parse_args(argv)
    out_dir = a.out or os.path.join(os.path.join(CLONE, "results") if os.path.isdir(CLONE)
                                    else "qcow2fast-bench", time.strftime("suite-%Y%m%d-%H%M%S"))
    os.makedirs(out_dir, exist_ok=True)
    failed = []
    lines = [f"# qcow2fast benchmark suite ({'quick' if a.quick else 'full'} mode, "
             f"{time.strftime('%Y-%m-%d %H:%M')})", ""]
    for name, module, what, plots in SCENARIOS:
        if a.only and name not in a.only:
            continue
        print(f"== {name}: {what}", file=sys.stderr, flush=True)
        status, out, secs = run_scenario(name, module, a.quick, out_dir)
        lines += [f"## {name}", "", what, "", f"`python -m {scenario_module(module) or module}"
                  f"{' --quick' if a.quick else ''}` ({secs:.0f} s)", ""]
        if status:
            failed.append(name)
            lines += [f"**FAILED** (exit status {status})", ""]
        lines += [out.strip(), ""]
        if plots and not status:
            lines += [f"![{name}]({name}.png)", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"results in {out_dir}" + (f"; FAILED: {', '.join(failed)}" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0
