"""Start-up: short commands on a small image, qcow2fast beside qemu-img.

    python -m benchmarks.startup_bench [--runs N] [--json OUT]

A 1 GiB image with 8 MiB written over a 1 GiB base with 8 MiB written
(the chain a user snapshots, commits and rebases), copied afresh before
every timed command so that both tools start from the same bytes.  Each
command is timed as a user runs it (the console script; qemu-img), wall
time of the child, alternating which tool goes first; the median of
``--runs``.  The package is byte-compiled first, as pip installs it.

Beside them, the floors under every qcow2fast command, in the same run:
the interpreter alone (``python -S -c pass``), the interpreter with its
site packages as the console script starts it (``python -c pass``; here
this includes every ``.pth`` file of the environment), and that plus the
imports of the open path (``qcow2fast.cli``, ``qcow2fast.engine.image``)
and of numpy, which check, map, snapshot -c, commit and amend use for
their bulk table work.  What a command costs above its floor is its own
work and its own imports (``python -X importtime -m qcow2fast CMD ...``
names them).
"""

import json
import os
import shutil
import statistics
import sys

from .common import (bench_parser, choose_tmpdir, log, qcow2fast_command, run,
                     timed_command)

# (name, arguments; IMG is the top image, BASE the backing file's name)
COMMANDS = [
    ("info", ["info", "IMG"]),
    ("info json", ["info", "--output=json", "IMG"]),
    ("check", ["check", "IMG"]),
    ("map", ["map", "IMG"]),
    ("compare", ["compare", "IMG", "IMG"]),
    ("snapshot -l", ["snapshot", "-l", "IMG"]),
    ("snapshot -c", ["snapshot", "-c", "s1", "IMG"]),
    ("resize +1G", ["resize", "IMG", "+1G"]),
    ("amend lazy", ["amend", "-o", "lazy_refcounts=on", "IMG"]),
    ("commit", ["commit", "IMG"]),
    ("rebase -u", ["rebase", "-u", "-b", "BASE", "-F", "qcow2", "IMG"]),
]
FLOORS = [
    ("python -S -c pass", ["-S", "-c", "pass"]),
    ("python -c pass", ["-c", "pass"]),
    ("+ open-path imports", ["-c", "import qcow2fast.cli, qcow2fast.engine.image"]),
    ("+ numpy", ["-c", "import qcow2fast.cli, qcow2fast.engine.image, numpy"]),
]


def make_images(d):
    base, top = os.path.join(d, "base.qcow2"), os.path.join(d, "img.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", base, "1G"])
    run(["qemu-io", "-c", "write -P 1 0 8M", base])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top])
    run(["qemu-io", "-c", "write -P 2 4M 8M", top])
    return base, top


def timed(cmd, cwd=None):
    """Wall seconds of ``cmd`` run to success in ``cwd``."""
    return timed_command(cmd, cwd=cwd)[0]


def main(argv=None):
    p = bench_parser("startup_bench", __doc__, "3 runs instead of 7")
    a = p.parse_args(argv)
    runs = a.runs or (3 if a.quick else 7)
    tmp, _ = choose_tmpdir(a.tmpdir, 64 << 20, prefix="qcow2fast-startup-bench-")
    qf = qcow2fast_command()
    results = {"commands": [], "floors": []}
    try:
        base, top = make_images(tmp)
        work = os.path.join(tmp, "w")
        os.makedirs(work)
        for _ in range(2):                          # warm the page cache and the .pyc files
            timed(qf + ["info", top])
            timed([a.qemu_img, "info", top])
        for name, args in COMMANDS:
            times = {"qemu-img": [], "qcow2fast": []}
            for r in range(runs):
                order = [("qemu-img", [a.qemu_img]), ("qcow2fast", qf)]
                for tool, prog in (order if r % 2 == 0 else order[::-1]):
                    shutil.copy(base, os.path.join(work, "base.qcow2"))
                    shutil.copy(top, os.path.join(work, "img.qcow2"))
                    cmd = prog + [x.replace("IMG", os.path.join(work, "img.qcow2"))
                                  .replace("BASE", "base.qcow2") for x in args]
                    times[tool].append(timed(cmd, cwd=work))
            q, f = (statistics.median(times[k]) for k in ("qemu-img", "qcow2fast"))
            results["commands"].append({"command": name, "qemu_s": q, "qcow2fast_s": f,
                                        "ratio": q / f, "runs": times})
            log(f"{name:14} qemu-img {q * 1000:7.1f} ms   qcow2fast {f * 1000:7.1f} ms   "
                f"ratio {q / f:5.2f}x")
        for name, args in FLOORS:
            t = statistics.median(timed([sys.executable] + args) for _ in range(runs))
            results["floors"].append({"floor": name, "s": t})
            log(f"{name:22} {t * 1000:7.1f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as out:
            json.dump(results, out, indent=1)
    print(report(results, runs))
    return 0


def report(results, runs):
    """The Markdown tables of ``results`` (main's)."""
    lines = [f"Median wall time of {runs} runs, small image (see the module's help).", "",
             "| command | qemu-img | qcow2fast | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['command']} | {r['qemu_s'] * 1000:.1f} ms | {r['qcow2fast_s'] * 1000:.1f} ms "
              f"| {r['ratio']:.2f}x |" for r in results["commands"]]
    lines += ["", "| floor | wall |", "|---|---|"]
    lines += [f"| `{r['floor']}` | {r['s'] * 1000:.1f} ms |" for r in results["floors"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
