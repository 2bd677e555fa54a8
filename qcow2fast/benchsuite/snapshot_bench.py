"""Internal snapshot create and delete: ``qcow2fast snapshot`` beside
``qemu-img snapshot`` on large, fully mapped images, in one run.

    python -m benchmarks.snapshot_bench [--quick] [--runs N] [--json OUT] [--tmpdir DIR]

Images (made once per invocation in a scratch directory, deleted after),
every guest cluster mapped through preallocation=metadata (host space
sparse, so they fit anywhere):

- ``meta-64k``: 64 GiB virtual (16 GiB with --quick), 64 KiB clusters:
  1 Mi data clusters, 128 L2 tables;
- ``meta-4k``: 16 GiB virtual (4 GiB with --quick), 4 KiB clusters:
  4 Mi data clusters in 8192 L2 tables, the heavy case per byte.

Each run takes a snapshot and deletes it again with each tool, as the user
would (``qemu-img snapshot -c s IMG`` then ``-d s``; ``qcow2fast snapshot
-c s IMG`` then ``-d s``; process start-up included), alternating which
tool goes first, on the same page-cached image.  The image is the same
before each create (a snapshot of the whole active table taken and
dropped), and is checked with ``qemu-img check`` at the end.  Reported:
median wall time and median CPU time (user+sys) per command, and the
speed ratios qemu/qcow2fast (>1: qcow2fast faster) with the range of the
per-run wall ratios; the "library" columns time ``Image.create_snapshot``
/ ``delete_snapshot`` inside one process (no start-up, no open: what an
embedding program pays), wall and CPU.  The package is byte-compiled
first (as pip installs it), so no command pays for compiling it.
"""

import json
import os
import shutil
import subprocess
import sys

from .common import (GiB, MiB, BenchError, bench_parser, log, qcow2fast_command,
                     ratio_info, run, scenario_main, summarise, timed_command)

SIZES = {"full": {"meta-64k": 64 * GiB, "meta-4k": 16 * GiB, "runs": 5},
         "quick": {"meta-64k": 16 * GiB, "meta-4k": 4 * GiB, "runs": 3}}
CLUSTERS = {"meta-64k": 65536, "meta-4k": 4096}

MAKE = """
import sys, qcow2fast
qcow2fast.create(sys.argv[1], int(sys.argv[2]), cluster_size=int(sys.argv[3]),
                 preallocation="metadata")
"""

LIBRARY_TIMES = """
import json, sys, time, qcow2fast
path, runs = sys.argv[1], int(sys.argv[2])
out = {k: [] for k in ("create", "delete", "create_cpu", "delete_cpu")}
with qcow2fast.open(path, "r+") as img:
    img.create_snapshot("warm")
    img.delete_snapshot("warm")
    for _ in range(runs):
        for op, call in (("create", img.create_snapshot), ("delete", img.delete_snapshot)):
            t, c = time.perf_counter(), time.process_time()
            call("lib")
            out[op].append(time.perf_counter() - t)
            out[op + "_cpu"].append(time.process_time() - c)
print(json.dumps(out))
"""


def bench_image(a, name, path):
    tools = {"qemu-img": [a.qemu_img, "snapshot"], "qcow2fast": [*qcow2fast_command(), "snapshot"]}
    samples = {t: {k: [] for k in ("create", "delete", "create_cpu", "delete_cpu")}
               for t in tools}
    for t, cmd in tools.items():            # warm-up: page cache and first-run costs
        timed_command([*cmd, "-c", "warm", path])
        timed_command([*cmd, "-d", "warm", path])
    for r in range(a.runs):
        order = list(tools) if r % 2 == 0 else list(reversed(tools))
        for t in order:
            for op, flag in (("create", "-c"), ("delete", "-d")):
                wall, cpu = timed_command([*tools[t], flag, "s", path])
                samples[t][op].append(wall)
                samples[t][op + "_cpu"].append(cpu)
    lib = json.loads(run([sys.executable, "-c", LIBRARY_TIMES, path, str(a.runs)]).stdout)
    check = subprocess.run([a.qemu_img, "check", path], capture_output=True)
    if check.returncode != 0:
        raise BenchError(f"qemu-img check {path} after the runs: exit {check.returncode}\n"
                         f"{check.stdout.decode()[-2000:]}")
    out = {"image": name, "virtual_size": SIZES[a.mode][name], "cluster_size": CLUSTERS[name],
           "samples": samples, "library": lib}
    for op in ("create", "delete", "create_cpu", "delete_cpu"):
        out[f"{op}_ratio"] = ratio_info(samples["qemu-img"][op], samples["qcow2fast"][op])
        out[f"{op}_library_ratio"] = ratio_info(samples["qemu-img"][op], lib[op])
        log(f"  {name} {op}: qemu-img {summarise(samples['qemu-img'][op])['median']:.3f} s, "
            f"qcow2fast {summarise(samples['qcow2fast'][op])['median']:.3f} s, "
            f"library {summarise(lib[op])['median']:.3f} s")
    return out


def report(results, out=sys.stdout):
    print("\nmedians; wall / CPU (user+sys) seconds; ratio = qemu-img / qcow2fast (>1: "
          "qcow2fast faster), wall range in brackets\n", file=out)
    print("| image | op | qemu-img wall / CPU | qcow2fast command wall / CPU | ratio wall (range) "
          "/ CPU | library call wall / CPU | ratio wall / CPU |", file=out)
    print("|---|---|---|---|---|---|---|", file=out)
    for r in results:
        for op in ("create", "delete"):
            med = {who: [summarise(src[k])["median"] for k in (op, op + "_cpu")]
                   for who, src in (("q", r["samples"]["qemu-img"]),
                                    ("f", r["samples"]["qcow2fast"]), ("lib", r["library"]))}
            rr, rc = r[f"{op}_ratio"], r[f"{op}_cpu_ratio"]
            lr, lc = r[f"{op}_library_ratio"], r[f"{op}_cpu_library_ratio"]
            print(f"| {r['image']} ({r['virtual_size'] // GiB} GiB) | {op} | "
                  f"{med['q'][0]:.3f} / {med['q'][1]:.3f} s | "
                  f"{med['f'][0]:.3f} / {med['f'][1]:.3f} s | "
                  f"{rr['ratio']:.2f}x ({rr['min']:.2f}-{rr['max']:.2f}) / {rc['ratio']:.2f}x | "
                  f"{med['lib'][0]:.3f} / {med['lib'][1]:.3f} s | "
                  f"{lr['ratio']:.2f}x / {lc['ratio']:.2f}x |", file=out)


def collect(a, tmpdir):
    results = []
    for name, cs in CLUSTERS.items():
        path = os.path.join(tmpdir, f"{name}.qcow2")
        size = SIZES[a.mode][name]
        log(f"  creating {name}: {size // GiB} GiB, preallocation=metadata, cluster_size={cs}")
        run([sys.executable, "-c", MAKE, path, str(size), str(cs)])
        results.append(bench_image(a, name, path))
        os.unlink(path)
    return results


def main(argv=None):
    p = bench_parser("python -m benchmarks.snapshot_bench", __doc__,
                     "16 GiB / 4 GiB images, 3 runs")
    a = p.parse_args(argv)
    a.mode = "quick" if a.quick else "full"
    a.runs = a.runs or SIZES[a.mode]["runs"]
    if not shutil.which(a.qemu_img):
        p.error(f"{a.qemu_img} not found (Debian: apt-get install qemu-utils)")
    return scenario_main(a, "snapshot-bench", 512 * MiB, collect, report,
                         meta={"mode": a.mode, "runs": a.runs})


if __name__ == "__main__":
    sys.exit(main())
