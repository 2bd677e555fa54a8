"""Fleet throughput: ``convert_many`` on 1 and 2 workers -- the local
process pool and a Dask LocalCluster -- beside ``qemu-img convert`` run
1 and 2 at a time, in one run.

    python -m benchmarks.fleet_bench [--quick] [--runs N] [--images N] [--json OUT]

The sources are raw images (16 of 32 MiB; --quick 8 of 16 MiB): a quarter
random bytes, half compressible text, a quarter holes.  Every job converts
one to a zlib-compressed qcow2 (``convert -c``) on one thread (qcow2fast
``threads=1``, qemu-img ``-m 1``), so an image's work is CPU-bound and the
number of workers is what changes.  The pool and the cluster are started
(and warmed) before the clock starts; qemu-img's workers are processes
started per image (as a shell script's ``xargs -P`` would).  Reported:
images and source MiB per second, median of the runs, and the speed-up of
2 workers over 1.  Every output of each configuration's first run must
pass ``qemu-img check`` and compare equal to its source.

On a 2-CPU machine 2 workers can at best double the throughput; the
machine's other load shows in the speed-up."""

import concurrent.futures
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from .common import MiB, BenchError, bench_parser, choose_tmpdir, log, run

WORKERS = (1, 2)


def make_source(path, size, seed):
    """A raw image: random, compressible and hole quarters."""
    rng = np.random.default_rng(seed)
    q = size // 4
    words = np.array([b"qcow2 ", b"cluster ", b"refcount ", b"table ", b"fleet\n"])
    text = b"".join(rng.choice(words, q // 4)).ljust(2 * q, b".")[:2 * q]
    with open(path, "wb") as f:
        f.write(rng.bytes(q))
        f.write(text)
        f.truncate(size)


def _qemu_convert(job):
    src, dst = job
    p = subprocess.run(["qemu-img", "convert", "-c", "-m", "1", "-O", "qcow2", src, dst],
                       capture_output=True, text=True)
    if p.returncode:
        raise BenchError(f"qemu-img convert {src}: {p.stderr}")


def run_qemu(jobs, workers):
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        list(ex.map(_qemu_convert, jobs))


def run_fleet(jobs, executor):
    from qcow2fast.fleet import ConvertJob, convert_many
    records = convert_many([ConvertJob(s, d, {"compress": True, "threads": 1})
                            for s, d in jobs], executor)
    bad = [r for r in records if not r.ok]
    if bad:
        raise BenchError(f"convert_many: {bad[0].path}: {bad[0].error}")


def verify(jobs):
    for src, dst in jobs:
        run(["qemu-img", "check", "-q", dst])
        run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", src, dst])


class Engines:
    """The executors, started before timing: {(engine, workers): run(jobs)}."""

    def __init__(self):
        self.closers = []
        self.runs = {}
        for w in WORKERS:
            pool = concurrent.futures.ProcessPoolExecutor(w)
            [f.result() for f in [pool.submit(os.getpid) for _ in range(w)]]   # started
            self.closers.append(pool.shutdown)
            self.runs[("pool", w)] = lambda jobs, pool=pool: run_fleet(jobs, pool)
            self.runs[("qemu-img", w)] = lambda jobs, w=w: run_qemu(jobs, w)
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            log("dask.distributed not installed (pip install 'qcow2fast[dask]'): "
                "no Dask figures")
            return
        import logging
        for w in WORKERS:
            cluster = LocalCluster(n_workers=w, processes=True, threads_per_worker=1,
                                   dashboard_address=":0", silence_logs=logging.ERROR)
            client = Client(cluster)
            self.closers += [cluster.close, client.close]
            ex = client.get_executor()
            self.runs[("dask", w)] = lambda jobs, ex=ex: run_fleet(jobs, ex)

    def close(self):
        for close in reversed(self.closers):
            close()


def main(argv=None):
    p = bench_parser("fleet_bench", __doc__, "8 images of 16 MiB, 3 runs")
    p.add_argument("--images", type=int, help="number of images")
    a = p.parse_args(argv)
    n = a.images or (8 if a.quick else 16)
    size = (16 if a.quick else 32) * MiB
    runs = a.runs or (3 if a.quick else 5)
    if not shutil.which("qemu-img"):
        p.error("qemu-img not found (Debian: apt-get install qemu-utils)")
    tmp, _ = choose_tmpdir(a.tmpdir, 3 * n * size, prefix="qcow2fast-fleet-bench-")
    engines = None
    results = []
    try:
        sources = [os.path.join(tmp, f"src{i}.raw") for i in range(n)]
        for i, s in enumerate(sources):
            make_source(s, size, i)
        engines = Engines()
        times = {key: [] for key in engines.runs}
        for r in range(runs):
            keys = list(engines.runs)
            if r % 2:
                keys.reverse()          # alternate the order between runs
            for engine, w in keys:
                jobs = [(s, os.path.join(tmp, f"{engine}{w}.{i}.qcow2"))
                        for i, s in enumerate(sources)]
                for _, d in jobs:
                    if os.path.exists(d):
                        os.unlink(d)
                t = time.perf_counter()
                engines.runs[(engine, w)](jobs)
                times[(engine, w)].append(time.perf_counter() - t)
                if r == 0:
                    verify(jobs)
        for (engine, w), ts in times.items():
            med = statistics.median(ts)
            one = statistics.median(times[(engine, 1)])
            results.append({"engine": engine, "workers": w, "images": n, "image_bytes": size,
                            "seconds": ts, "median_s": med, "images_per_s": n / med,
                            "mib_per_s": n * size / MiB / med, "speedup_vs_1": one / med})
    finally:
        if engines is not None:
            engines.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{n} images of {size // MiB} MiB, convert -c to qcow2, one thread per image, "
          f"median of {runs} runs\n")
    print("| engine | workers | images/s | MiB/s | speed-up vs 1 worker |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['engine']} | {r['workers']} | {r['images_per_s']:.2f} | "
              f"{r['mib_per_s']:.1f} | {r['speedup_vs_1']:.2f}x |")
    if a.json:
        import json
        with open(a.json, "w") as f:
            json.dump({"results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
