"""External data files: 4 KiB reads and overwrites of an image with a data
file (data_file_raw, so every cluster is mapped), and convert of a raw
image into one, qcow2fast beside qemu-img in the same run.

    python -m benchmarks.datafile_bench [--size MiB] [--count N] [--runs N] [--dir D]

Allocating writes: the same requests into a fresh image whose (non-raw)
data file is empty.  Reads and writes: ``count`` requests at offsets i * step mod size (step
7919 * 4 KiB), page-cached: qemu-img bench -d 1 -i io_uring -t writeback
(its "Run completed in" time) against qcow2fast's Image.readinto /
Image.write loop in one process (the loop's time).  Convert: the wall time
of ``qemu-img convert -O qcow2 -o data_file=...,data_file_raw=on`` and of
``qcow2fast convert`` with the same options, from a half-written raw file.
Medians of ``runs``; each output is checked with qemu-img compare.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import qcow2fast

from .common import MiB, qcow2fast_command
from .io_engines import Qemu, qf_read, qf_write
from .io_setup import probe_aio, warm_page_cache
from .io_config import REQ, WRITE_PATTERN

STEP = 7919 * REQ


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="disk size in MiB")
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=None)
    a = p.parse_args(argv)
    qemu_img = shutil.which("qemu-img")
    tmp = tempfile.mkdtemp(prefix="qcow2fast-datafile-bench-", dir=a.dir)
    try:
        aio, _ = probe_aio(qemu_img, tmp)
        qemu = Qemu(qemu_img, aio)
        size = a.size * MiB
        src = os.path.join(tmp, "src.raw")
        with open(src, "wb") as f:          # half data, half holes
            chunk = os.urandom(MiB)
            for off in range(0, size, 2 * MiB):
                f.seek(off)
                f.write(chunk)
            f.truncate(size)
        img, data = os.path.join(tmp, "d.qcow2"), os.path.join(tmp, "d.raw")
        subprocess.run([qemu_img, "convert", "-O", "qcow2", "-o",
                        f"data_file={data},data_file_raw=on", src, img], check=True)
        warm_page_cache(img, data, src)
        offsets = [(i * STEP) % (size - REQ) // REQ * REQ for i in range(a.count)]
        buf = bytearray(REQ)
        payload = bytes([WRITE_PATTERN]) * REQ
        rows = []
        for name, write in (("4 KiB reads", False), ("4 KiB overwrites", True)):
            q, f = [], []
            for _ in range(a.runs):
                q.append(qemu.bench(img, a.count, STEP, write)["loop"])
                f.append((qf_write(qcow2fast, img, offsets, payload) if write
                          else qf_read(qcow2fast, img, offsets, buf))["loop"])
            rows.append((name, a.count / statistics.median(q), a.count / statistics.median(f),
                         "IOPS"))
        q, f = [], []     # allocating writes: fresh images with a (non-raw) data file
        for _ in range(a.runs):
            for engine, out in (("q", q), ("f", f)):
                fresh, fdata = os.path.join(tmp, "w.qcow2"), os.path.join(tmp, "w.raw")
                for x in (fresh, fdata):
                    if os.path.exists(x):
                        os.unlink(x)
                qcow2fast.create(fresh, size, data_file=fdata)
                if engine == "q":
                    out.append(qemu.bench(fresh, a.count, STEP, True)["loop"])
                else:
                    out.append(qf_write(qcow2fast, fresh, offsets, payload)["loop"])
        rows.append(("4 KiB allocating writes", a.count / statistics.median(q),
                     a.count / statistics.median(f), "IOPS"))
        q, f = [], []
        cli = qcow2fast_command()
        for _ in range(a.runs):
            for dest, cmd, out in (("q", [qemu_img], q), ("f", cli, f)):
                target = os.path.join(tmp, f"{dest}.qcow2")
                tdata = os.path.join(tmp, f"{dest}.raw")
                for x in (target, tdata):
                    if os.path.exists(x):
                        os.unlink(x)
                t0 = time.perf_counter()
                subprocess.run(cmd + ["convert", "-O", "qcow2", "-o",
                                      f"data_file={tdata},data_file_raw=on", src, target],
                               check=True)
                out.append(time.perf_counter() - t0)
                subprocess.run([qemu_img, "compare", "-q", src, target], check=True)
        rows.append(("convert raw -> qcow2+data file", size / MiB / statistics.median(q),
                     size / MiB / statistics.median(f), "MiB/s"))
        print(f"{'scenario':<34}{'qemu-img':>12}{'qcow2fast':>12}{'ratio':>8}")
        for name, qv, fv, unit in rows:
            print(f"{name:<34}{qv:>12.0f}{fv:>12.0f}{fv / qv:>7.2f}x  {unit}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
