"""``qcow2fast check`` beside ``qemu-img check`` on large images, in one run.

    python -m benchmarks.check_bench [--quick] [--runs N] [--json OUT] [--plot PNG] [--keep]

Images (made once per invocation in a scratch directory, deleted after):

- ``meta-64k``: 64 GiB virtual (16 GiB with --quick), preallocation=metadata,
  64 KiB clusters: every guest cluster mapped, little real data on disk.
- ``meta-4k``: the same with 4 KiB clusters: 16 times the L2 and refcount
  metadata (160 MiB of tables for 64 GiB), the heavy case.
- ``data``: 4 GiB (1 GiB with --quick) full of written data, 64 KiB clusters.

Each run starts both commands as the user would (``qemu-img check
--output=json IMG`` and ``python -m qcow2fast check --output=json IMG``,
process start-up included) on the page-cached image, alternating which goes
first; every run's JSON and exit status must be equal, or the benchmark
fails.  Reported: median wall time, CPU time (user+sys) and peak RSS of the
child, and the speed ratio qemu/qcow2fast (>1: qcow2fast faster) with the
range of the per-run ratios.  Python and numpy start-up cost qcow2fast about
0.2 s per command (measured: ``python -m qcow2fast --help``), which dominates on small metadata; the "library call"
column is ``qcow2fast.fsck.check.check_image`` timed inside one process (what an
embedding program pays), with its ratio to the qemu-img command.
"""

import json
import os
import shutil
import subprocess
import sys
import time

from .common import (GiB, MiB, BenchError, bench_parser, choose_tmpdir, log, ratio_info, run,
                     qcow2fast_command, summarise)
from .report import bar_groups, fmt_ratio, panels, save_figure

SIZES = {"full": {"meta": 64 * GiB, "data": 4 * GiB, "runs": 5},
         "quick": {"meta": 16 * GiB, "data": 1 * GiB, "runs": 3}}
# Writes the data image, in a child: this process stays small, so that the
# peak RSS the children report (which counts what they inherit at fork) is
# their own.
WRITE_DATA = """
import os, sys, qcow2fast
path, size, chunk = sys.argv[1], int(sys.argv[2]), os.urandom(64 << 20)
qcow2fast.create(path, size)
with qcow2fast.open(path, "r+") as img:
    for off in range(0, size, len(chunk)):
        img.write(off, chunk)
"""

# The same check as a library call in one process (no start-up, no imports):
# what an embedding program pays, and the work itself.
LIBRARY_TIMES = """
import json, sys, time
from qcow2fast.fsck.check import check_image
path, runs, times = sys.argv[1], int(sys.argv[2]), []
check_image(path)
for _ in range(runs):
    t = time.perf_counter()
    check_image(path)
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""

def run_child(cmd):
    """(exit status, stdout, wall s, CPU s, peak RSS KiB) of ``cmd``, from
    its own rusage (os.wait4)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = p.stdout.read()
    p.stdout.close()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, out, wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss


def make_images(a, tmpdir):
    sizes = SIZES[a.mode]
    images = {}
    for name, cs in (("meta-64k", "64k"), ("meta-4k", "4k")):
        path = os.path.join(tmpdir, f"{name}.qcow2")
        log(f"  creating {name}: {sizes['meta'] // GiB} GiB, preallocation=metadata, "
            f"cluster_size={cs}")
        run([a.qemu_img, "create", "-q", "-f", "qcow2", "-o",
             f"preallocation=metadata,cluster_size={cs}", path, str(sizes["meta"])])
        images[name] = path
    path = os.path.join(tmpdir, "data.qcow2")
    log(f"  creating data: {sizes['data'] // GiB} GiB written")
    run([sys.executable, "-c", WRITE_DATA, path, str(sizes["data"])])
    images["data"] = path
    return images


def bench_image(a, name, path):
    engines = {"qemu-img": [a.qemu_img, "check", "--output=json", path],
               "qcow2fast": [*qcow2fast_command(), "check", "--output=json", path]}
    samples = {e: {"wall": [], "cpu": [], "rss_kib": []} for e in engines}
    outputs = {}
    for e, cmd in engines.items():       # warm-up: page cache and first-run costs
        run_child(cmd)
    for r in range(a.runs):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for e in order:
            status, out, wall, cpu, rss = run_child(engines[e])
            if status != 0:
                raise BenchError(f"{e} check {path} exited {status}")
            outputs[e] = json.loads(out)
            samples[e]["wall"].append(wall)
            samples[e]["cpu"].append(cpu)
            samples[e]["rss_kib"].append(rss)
        if outputs["qemu-img"] != outputs["qcow2fast"]:
            raise BenchError(f"{name}: check output differs:\n{outputs}")
    lib = json.loads(run([sys.executable, "-c", LIBRARY_TIMES, path, str(a.runs)]).stdout)
    info = outputs["qemu-img"]
    log(f"  {name}: qemu-img {summarise(samples['qemu-img']['wall'])['median']:.3f} s, "
        f"qcow2fast {summarise(samples['qcow2fast']['wall'])['median']:.3f} s")
    return {"image": name, "file_size": os.path.getsize(path), "samples": samples,
            "allocated_clusters": info.get("allocated-clusters"),
            "image_end_offset": info.get("image-end-offset"),
            "library_wall": lib,
            "ratio": ratio_info(samples["qemu-img"]["wall"], samples["qcow2fast"]["wall"]),
            "library_ratio": ratio_info(samples["qemu-img"]["wall"], lib)}


def report(results, out=sys.stdout):
    print("\n| image | qemu-img check | qcow2fast check | speed ratio (range) | "
          "CPU qemu / ours | peak RSS qemu / ours | library call | ratio |", file=out)
    print("|---|---|---|---|---|---|---|---|", file=out)
    for r in results:
        q, f = r["samples"]["qemu-img"], r["samples"]["qcow2fast"]
        med = {k: (summarise(q[k])["median"], summarise(f[k])["median"]) for k in q}
        print(f"| {r['image']} | {med['wall'][0]:.3f} s | {med['wall'][1]:.3f} s | "
              f"{fmt_ratio(r['ratio'])} | "
              f"{med['cpu'][0]:.2f} / {med['cpu'][1]:.2f} s | "
              f"{med['rss_kib'][0] / 1024:.0f} / {med['rss_kib'][1] / 1024:.0f} MiB | "
              f"{summarise(r['library_wall'])['median']:.3f} s | "
              f"{r['library_ratio']['ratio']:.2f}x |", file=out)


def plot(results, path):
    """Wall time, CPU time and peak RSS per image (median, min-max over the
    runs), the commands beside qcow2fast's library call."""
    groups = [r["image"] for r in results]
    fig, axes = panels(3, 4.4, 4.0)
    for ax, key, unit, title, scale in (
            (axes[0], "wall", "wall time (s)", "check: wall time", 1),
            (axes[1], "cpu", "CPU time, user + sys (s)", "check: CPU time", 1),
            (axes[2], "rss_kib", "peak RSS (MiB)", "check: peak memory", 1 / 1024)):
        series = [(f"{e} check", [[v * scale for v in r["samples"][e][key]] for r in results])
                  for e in ("qemu-img", "qcow2fast")]
        if key == "wall":
            series.append(("qcow2fast library call", [r["library_wall"] for r in results]))
        bar_groups(ax, groups, series, unit, title, log="auto")
    fig.suptitle("page-cached images: meta-64k / meta-4k preallocation=metadata with 64 KiB / "
                 f"4 KiB clusters, data fully written; {len(results[0]['library_wall'])} runs",
                 fontsize="medium")
    save_figure(fig, path, legend=axes[0])


def main(argv=None):
    p = bench_parser("python -m benchmarks.check_bench", __doc__, "16 GiB / 1 GiB images, 3 runs")
    p.add_argument("--keep", action="store_true", help="keep the images")
    a = p.parse_args(argv)
    a.mode = "quick" if a.quick else "full"
    a.runs = a.runs or SIZES[a.mode]["runs"]
    if not shutil.which(a.qemu_img):
        p.error(f"{a.qemu_img} not found (Debian: apt-get install qemu-utils)")
    need = SIZES[a.mode]["data"] + 512 * MiB
    try:
        tmpdir, _ = choose_tmpdir(a.tmpdir, need, prefix="qcow2fast-check-bench-")
    except BenchError as e:
        log(f"check_bench: {e}")
        return 1
    results = []
    try:
        images = make_images(a, tmpdir)
        for name, path in images.items():
            results.append(bench_image(a, name, path))
    except BenchError as e:
        log(f"check_bench: {e}")
        return 1
    finally:
        if a.keep:
            log(f"  kept images in {tmpdir}")
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)
    report(results)
    if a.plot:
        plot(results, a.plot)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"mode": a.mode, "runs": a.runs, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
