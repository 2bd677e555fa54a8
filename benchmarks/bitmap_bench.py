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
table; ``e2e`` adds open, flush and close (where the bitmaps are written
back).  The goal: ``on`` within 5% of ``off`` in the loop.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

from .common import MiB, log
from .io_bench import qemu_img_create, qf_write
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
            samples = {v: {"loop": [], "e2e": []} for v in VARIANTS}
            for r in range(runs):
                for v, grans in VARIANTS.items():     # interleaved: same conditions
                    path = os.path.join(tmp, f"{name}-{v}.qcow2")
                    if r == 0 or not filled:
                        make_image(qcow2fast, qemu_img, path, size, filled, grans)
                    t = qf_write(qcow2fast, path, offsets, data)
                    samples[v]["loop"].append(t["loop"])
                    samples[v]["e2e"].append(t["e2e"])
            med = {v: {k: statistics.median(x) for k, x in s.items()}
                   for v, s in samples.items()}
            results[name] = {"count": count, "runs": runs, "median_s": med, "samples_s": samples}
            base = med["off"]["loop"]
            log(f"{name:18s} loop off {count / base:9.0f} IOPS   "
                + "   ".join(f"{v} {med[v]['loop'] / base - 1:+6.1%}" for v in VARIANTS
                             if v != "off")
                + f"   (e2e on {med['on']['e2e'] / med['off']['e2e'] - 1:+6.1%})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
