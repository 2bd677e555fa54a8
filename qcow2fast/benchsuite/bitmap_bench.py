"""What dirty tracking costs: io_bench's write scenarios (4 KiB requests,
queue depth 1, 64 KiB clusters, writeback) run by qcow2fast on images
without a persistent bitmap and with enabled ones, interleaved in the same
run, medians over several runs.

    python -m benchmarks.bitmap_bench [--quick] [--runs N] [--json OUT]

``off``   no bitmap;
``on``    one enabled bitmap of 64 KiB granularity (qemu-img bitmap --add's
          default for these clusters);
``on4``   four enabled bitmaps (64 KiB, 64 KiB, 4 KiB, 512 B granularity).

``loop`` is the request loop alone (the image open), as io_bench's main
table, in wall time and in CPU time of the process (user + system: much
less disturbed by other load on a shared machine, and what tracking adds
to); ``e2e`` adds open, flush and close (where the bitmaps are written
back).  The goal: ``on`` within 5% of ``off`` in the loop.
"""

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from .common import MiB, log
from .io_setup import qemu_img_create
from .io_config import CLUSTER, REQ, SCATTER_STEP

SCENARIOS = [("overwrite-seq", True, REQ), ("overwrite-scatter", True, SCATTER_STEP),
             ("alloc-S64K", False, CLUSTER), ("alloc-S4K", False, REQ)]
VARIANTS = {"off": [], "on": [65536], "on4": [65536, 65536, 4096, 512]}


def make_image(qcow2fast, qemu_img, path, size, filled, grans):
    qemu_img_create(qemu_img, path, size)
    with qcow2fast.open(path, "r+") as img:
        if filled:
            chunk = b"\x5a" * (4 * MiB)
            for off in range(0, size, len(chunk)):
                img.write(off, chunk)
        for k, g in enumerate(grans):
            img.add_bitmap(f"b{k}", g)


def qf_write_timed(qcow2fast, path, offsets, data):
    """io_bench's qf_write, with the loop's CPU time as well."""
    gc.disable()
    try:
        t0 = time.perf_counter()
        img = qcow2fast.open(path, "r+", cache_mode="writeback")
        write = img.write
        c1, t1 = time.process_time(), time.perf_counter()
        for off in offsets:
            write(off, data)
        c2, t2 = time.process_time(), time.perf_counter()
        img.flush()
        img.close()
        t3 = time.perf_counter()
    finally:
        gc.enable()
    return {"loop": t2 - t1, "cpu": c2 - c1, "e2e": t3 - t0}


def main(argv=None):
    p = argparse.ArgumentParser(prog="bitmap_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int)
    p.add_argument("--count", type=int)
    p.add_argument("--json")
    a = p.parse_args(argv)
    import qcow2fast
    qemu_img = shutil.which("qemu-img")
    size = (64 if a.quick else 256) * MiB
    runs = a.runs or (3 if a.quick else 7)
    count = a.count or (4096 if a.quick else 16384)
    data = b"\xa5" * REQ
    results = {}
    tmp = tempfile.mkdtemp(prefix="qcow2fast-bitmap-bench-")
    try:
        for name, filled, step in SCENARIOS:
            offsets = [(i * step) % size for i in range(count)]
            samples = {v: {"loop": [], "cpu": [], "e2e": []} for v in VARIANTS}
            for r in range(runs):
                for v, grans in VARIANTS.items():     # interleaved: same conditions
                    path = os.path.join(tmp, f"{name}-{v}.qcow2")
                    if r == 0 or not filled:
                        make_image(qcow2fast, qemu_img, path, size, filled, grans)
                    t = qf_write_timed(qcow2fast, path, offsets, data)
                    for key in t:
                        samples[v][key].append(t[key])
            med = {v: {k: statistics.median(x) for k, x in s.items()}
                   for v, s in samples.items()}
            results[name] = {"count": count, "runs": runs, "median_s": med, "samples_s": samples}
            base, cpu = med["off"]["loop"], med["off"]["cpu"]
            others = [v for v in VARIANTS if v != "off"]
            log(f"{name:18s} off {count / base:8.0f} IOPS {cpu / count * 1e6:5.2f} us CPU/write | "
                + "  ".join(f"{v}: wall {med[v]['loop'] / base - 1:+6.1%} "
                            f"cpu {med[v]['cpu'] / cpu - 1:+6.1%}" for v in others)
                + f" | e2e on {med['on']['e2e'] / med['off']['e2e'] - 1:+6.1%}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
