"""``qcow2fast resize`` and ``qcow2fast amend`` beside qemu-img, in one run.

    python -m benchmarks.resize_amend_bench [--quick] [--runs N] [--json OUT]

Scenarios (each image made once, then copied -- sparse, synced -- before
every timed command, so both tools start from the same bytes):

- ``grow``: a 1 TiB image (64 KiB clusters, 1 GiB written) resized to 4 TiB
  (the L1 table moves and grows);
- ``shrink-meta``: a 64 GiB image (16 GiB with --quick), 64 KiB clusters,
  preallocation=metadata (every cluster mapped), shrunk to 1 GiB;
- ``refcount-64k`` / ``refcount-4k``: ``amend -o refcount_bits=64`` on a
  64 GiB (16 GiB) metadata-preallocated image with 64 KiB / 4 KiB clusters
  (the refcount structures rewritten: 4 times larger).

Each run times both commands as a user runs them (process start-up
included: Python and numpy for qcow2fast), alternating which goes first;
both results must pass ``qemu-img check`` and compare equal.  The package
is byte-compiled first (as pip installs it).  Reported: median wall and
CPU (user+sys) seconds and the ratios qemu/qcow2fast (>1: qcow2fast
faster), and the same operation as a library call timed inside one
process (what an embedding program pays; no interpreter start-up)."""

import json
import os
import shutil
import statistics
import sys

from .common import (GiB, bench_parser, choose_tmpdir, log, qcow2fast_command,
                     run, timed_command)

TiB = 1024 * GiB


def scenarios(quick):
    meta = 16 * GiB if quick else 64 * GiB
    return [
        ("grow", dict(size=TiB, cs="64k", prealloc="off", data=True),
         ["resize", "{img}", str(4 * TiB)], f"img.resize({4 * TiB})"),
        ("shrink-meta", dict(size=meta, cs="64k", prealloc="metadata"),
         ["resize", "--shrink", "{img}", str(GiB)], f"img.resize({GiB}, shrink=True)"),
        ("refcount-64k", dict(size=meta, cs="64k", prealloc="metadata"),
         ["amend", "-o", "refcount_bits=64", "{img}"], "amend"),
        ("refcount-4k", dict(size=meta, cs="4k", prealloc="metadata"),
         ["amend", "-o", "refcount_bits=64", "{img}"], "amend"),
    ]


# The same operation as a library call, timed inside one process (no
# interpreter start-up): what an embedding program pays.
LIBRARY = """
import sys, time, qcow2fast, qcow2fast.engine.image
path, op = sys.argv[1], sys.argv[2]
t, c = time.perf_counter(), time.process_time()
if op == "amend":
    qcow2fast.amend(path, {"refcount_bits": 64})
else:
    with qcow2fast.open(path, "r+") as img:
        eval(op)
print(time.perf_counter() - t, time.process_time() - c)
"""


def make_template(path, size, cs, prealloc, data=False):
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         f"cluster_size={cs},preallocation={prealloc}", path, str(size)])
    if data:
        run(["qemu-io", "-c", "write -P 1 0 1G", path])


def fresh_copy(template, dest):
    """A sparse copy, synced: the timed command's flushes then write its own
    work, not the copy's dirty pages (qemu-img flushes the image it closes;
    1 GiB of them made its grow 0.02-0.13 s from run to run)."""
    run(["cp", "--sparse=always", template, dest])
    os.sync()


def main(argv=None):
    p = bench_parser("resize_amend_bench", __doc__, "smaller images, 3 runs")
    a = p.parse_args(argv)
    runs = a.runs or (3 if a.quick else 5)
    tmp, _ = choose_tmpdir(a.tmpdir, 2 * GiB, prefix="qcow2fast-resize-bench-")
    qf = qcow2fast_command()
    results = []
    try:
        for name, make, args, call in scenarios(a.quick):
            template = os.path.join(tmp, f"{name}.template.qcow2")
            make_template(template, **make)
            times = {k: [] for k in ("qemu-img", "qcow2fast", "library")}
            cpu = {k: [] for k in times}
            for r in range(runs):
                order = [("qemu-img", ["qemu-img"]), ("qcow2fast", qf)]
                if r % 2:
                    order.reverse()
                outs = {}
                for tool, prog in order:
                    img = os.path.join(tmp, f"{name}.{tool}.qcow2")
                    fresh_copy(template, img)
                    wall, used = timed_command(prog + [x.format(img=img) for x in args])
                    times[tool].append(wall)
                    cpu[tool].append(used)
                    outs[tool] = img
                run(["qemu-img", "check", "-q", outs["qcow2fast"]])
                run(["qemu-img", "compare", "-q", outs["qemu-img"], outs["qcow2fast"]])
                fresh_copy(template, outs["qcow2fast"])
                lib = run([sys.executable, "-c", LIBRARY, outs["qcow2fast"], call])
                wall, used = map(float, lib.stdout.split())
                times["library"].append(wall)
                cpu["library"].append(used)
            med = {k: (statistics.median(times[k]), statistics.median(cpu[k])) for k in times}
            (q, qc), (f, fc), (lib, lc) = med["qemu-img"], med["qcow2fast"], med["library"]
            results.append({"scenario": name, "qemu_s": q, "qcow2fast_s": f, "ratio": q / f,
                            "qemu_cpu_s": qc, "qcow2fast_cpu_s": fc, "cpu_ratio": qc / fc,
                            "library_s": lib, "library_ratio": q / lib, "library_cpu_s": lc,
                            "library_cpu_ratio": qc / lc, "runs": times, "cpu": cpu})
            log(f"{name:14} wall/CPU s: qemu-img {q:7.3f} / {qc:6.3f}   qcow2fast {f:7.3f} / "
                f"{fc:6.3f}   ratio {q / f:5.2f} / {qc / fc:5.2f}   library call {lib:7.3f} / "
                f"{lc:6.3f}   ratio {q / lib:5.2f} / {qc / lc:5.2f}")
            os.unlink(template)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as out:
            json.dump(results, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
