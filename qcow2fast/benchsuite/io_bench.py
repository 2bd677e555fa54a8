"""Queue-depth-1, 4 KiB I/O: qcow2fast versus ``qemu-img bench`` versus the
raw-file limit, on the same page-cached images, in one run.

    python -m benchmarks.io_bench [--quick] [--json OUT] [--plot PNG] [--runs N] [--count N]

Scenarios (every request is 4 KiB, queue depth 1, 64 KiB clusters, default
metadata caches, cache mode writeback on both sides):

``read``       reads of allocated data.  One image, fully written first (by
               qemu-img, not timed) and page-cached, read by both engines;
               the raw limit is ``os.preadv`` into a preallocated buffer on a
               raw copy of the same data (``qemu-img convert -O raw``).
               A second limit, "host", is the same ``os.preadv`` loop on the
               qcow2 file itself at the host offsets the requests map to
               (``qemu-img map``): the very pages the engines read, so it is
               free of the differences between two files' page-cache state
               (which are measurable here, for writes above all).
``overwrite``  overwrites of that same allocated image (run after the reads);
               raw limit ``os.pwrite`` on the raw copy, host limit
               ``os.pwrite`` into the qcow2 file's data clusters (same data at
               the same guest offsets, so the image stays consistent).
``alloc``      allocating writes into an empty image: a fresh image (made by
               ``qemu-img create``, not timed) per engine and per run.
               ``S=64K`` allocates a cluster on every write, ``S=4K`` once per
               16 writes.  The raw "limit" is ``os.pwrite`` into a fresh
               sparse raw file (the filesystem allocates blocks).

Offsets are qemu-img bench's: ``offset(i) = (i * step) mod image_size`` for
``i in range(count)``, starting at 0.  qemu-img bench has no random mode, so
besides the sequential step (-S 4K) the read/overwrite scenarios use a
"scatter" step of 7919 * 4 KiB (a prime number of 4 KiB blocks, so the walk
visits every block of a power-of-two-sized image before repeating, hopping
~31 MiB each time).  Both engines and the raw loop issue exactly the same
requests, in the same order.

Timing windows:

``loop``  (the main table) the window qemu-img bench reports: its "Run
          completed in X seconds." line, parsed and used as is (nothing
          subtracted; 1 ms resolution).  In qemu-img.c (7.2) the timer starts
          before the first request and stops when the last one has
          completed; opening the image, and the final flush and close (done
          by ``blk_unref()`` after the timer) are outside it (strace with -i
          threads shows the cached L2/refcount writes and two fdatasyncs after
          the "Run completed" line).  For qcow2fast
          and raw: ``time.perf_counter()`` around the Python request loop, the
          image/file already open, no flush.
``e2e``   (second table, write scenarios) including open and the final
          flush and close: qcow2fast ``open + loop + flush() + close()``;
          raw ``open + loop + os.fdatasync + close``; qemu the wall time of
          the whole ``qemu-img bench`` process (its close flushes the caches
          and fdatasyncs under -t writeback), which also includes exec and
          process start-up, reported separately as "qemu-img fixed cost".

qemu-img runs twice per sample set: free to use every CPU ("qemu-img"), and
pinned to one CPU ("qemu-img 1cpu", its io_uring worker threads inherit the
mask).  On a small VM the placement matters a lot for writes: io_uring hands
buffered writes to io-wq worker threads, and waking a worker on an idle
second vCPU costs tens of microseconds per request at queue depth 1 (seen
here: 4 KiB overwrites 10-15 us pinned, 50-70 us unpinned when the other
vCPU idles, but fast unpinned when it is busy).  The "qf vs qemu" ratio is
taken against the faster of the two, per scenario; JSON has both.

The raw and host loops are Python loops too (``os.preadv``/``os.pwrite``,
the interpreter's per-call cost included), so they are the limit for a
Python caller, not for C: qcow2fast's one Cython call per request can come
out slightly faster than ``os.preadv``.

Fairness: the data image and its raw copy are written back, dropped from
the page cache and read once the same way before the first sample, so both
files have the same page-cache history.  Every configuration runs
``--runs`` times (5, --quick 3), the engines in a rotating order so that
none always runs first, each sample starting after an ``os.sync()`` (not
timed) so that no engine pays for the write-back of another's dirty pages.

The tables show the median and the spread (min/max), IOPS, and speed ratios
(IOPS ratios: >1 means qcow2fast is faster); the ratio's bracket is the
range of the per-run ratios (the engines of one run are paired).  Results
are checked after timing: qcow2fast's reads against the raw file; the
images qcow2fast wrote with ``qemu-img check`` and ``qemu-img compare``
(against qemu's image and the raw file).  ``--json OUT`` writes every
sample.  Exit status: 0 when everything ran and verified, 1 otherwise.
"""

import argparse
import os
import shutil
import statistics
import sys
import time

from .common import (MiB, BenchError, choose_tmpdir, human, log, parse_size, ratio_info, round_up,
                     run, summarise)
from .io_config import (CLUSTER, DERIVED_COUNT, ENGINE_LABEL, ENGINES, FILL_PATTERN, MODES,
                        QEMU_ENGINES, REQ, SCENARIOS, WRITE_PATTERN)
from .io_engines import Qemu, host_map, qf_requests, raw_requests
from .io_setup import (probe_aio, qemu_check, qemu_compare, qemu_fixed_cost, qemu_img_create,
                       raw_create, settle_page_cache, verify_qf_overwrites, verify_reads)
from .report import plot, report, write_json

# -- the benchmark -------------------------------------------------------------------------


class IoBench:
    def __init__(self, args, qcow2fast):
        self.args = args
        self.qcow2fast = qcow2fast
        self.engines = args.engines
        self.loadavg_start = os.getloadavg()
        # qemu-img also runs pinned to one CPU ("qemu1"): its io_uring
        # requests that the kernel hands to io-wq worker threads then need no
        # cross-CPU wake-up, which costs tens of microseconds in a VM whose
        # other vCPU is idle.  The tables compare with the faster placement.
        allowed = sorted(os.sched_getaffinity(0))
        self.pin_cpu = allowed[0]
        if len(allowed) < 2 and "qemu1" in self.engines and "qemu" in self.engines:
            self.engines = [e for e in self.engines if e != "qemu1"]
        self.results = []
        self.failures = []

    def offsets(self, count, step, size):
        return [(i * step) % size for i in range(count)]

    def setup_data_image(self):
        """The pre-written image (every cluster allocated, FILL_PATTERN) and its
        raw copy, then both read once so they are page-cached."""
        a = self.args
        self.data_qcow2 = os.path.join(self.tmpdir, "data.qcow2")
        self.data_raw = os.path.join(self.tmpdir, "data.raw")
        t0 = time.perf_counter()
        qemu_img_create(a.qemu_img, self.data_qcow2, a.size)
        chunk = 1 * MiB
        run([a.qemu_img, "bench", "-f", "qcow2", "-w", "-c", str(a.size // chunk), "-d", "4",
             "-s", str(chunk), "-S", str(chunk), f"--pattern={FILL_PATTERN}", "-t",
             "writeback", "-i", self.aio, self.data_qcow2])
        run([a.qemu_img, "convert", "-f", "qcow2", "-O", "raw", self.data_qcow2, self.data_raw])
        settle_page_cache(self.data_qcow2, self.data_raw)
        if "host" in self.engines:
            self.to_host = host_map(a.qemu_img, self.data_qcow2)
        log(f"  data image: {human(a.size)} written by qemu-img in "
            f"{time.perf_counter() - t0:.1f} s (both files page-cached)")

    def run_scenario(self, name, kind, step, count):
        a = self.args
        write = kind != "read"
        size = a.size if kind != "alloc" else max(a.size, round_up(count * step, CLUSTER))
        offsets = self.offsets(count, step, size)
        engines = [e for e in self.engines if not (e == "host" and kind == "alloc")]
        host_offsets = ([self.to_host(off) for off in offsets] if "host" in engines
                        else None)
        qemu = Qemu(a.qemu_img, self.aio)
        data = bytes([WRITE_PATTERN]) * REQ
        buf = bytearray(REQ)
        samples = {e: [] for e in engines}
        errors = {}
        log(f"  {name}: {count} x 4 KiB, step {human(step)}, image {human(size)}, "
            f"{a.runs} runs")
        kept = {}
        for r in range(a.runs):
            order = engines[r % len(engines):] + engines[:r % len(engines)]
            for engine in order:
                if engine in errors:
                    continue
                try:
                    if kind == "alloc":
                        ext = "raw" if engine == "raw" else "qcow2"
                        path = os.path.join(self.tmpdir, f"{name}-{engine}.{ext}")
                        if engine == "raw":
                            raw_create(path, size)
                        else:
                            qemu_img_create(a.qemu_img, path, size)
                        kept[engine] = path
                    else:
                        path = self.data_raw if engine == "raw" else self.data_qcow2
                    offs = host_offsets if engine == "host" else offsets
                    # Start every sample with no dirty pages, so that the
                    # kernel does not write back one engine's data during the
                    # next engine's run.  Not timed.
                    os.sync()
                    if engine in QEMU_ENGINES:
                        res = qemu.bench(path, count, step, write,
                                         cpu=self.pin_cpu if engine == "qemu1" else None)
                    elif engine == "qcow2fast":
                        res = qf_requests(self.qcow2fast, path, offsets, data if write else buf,
                                          write)
                    else:
                        res = raw_requests(path, offs, data if write else buf, write)
                except Exception as e:          # report, keep the other engines going
                    errors[engine] = f"{type(e).__name__}: {e}"
                    log(f"    {ENGINE_LABEL[engine]} FAILED: {errors[engine]}")
                    continue
                samples[engine].append(res)

        verify = self.verify(kind, offsets, kept, errors)
        for path in kept.values():
            if os.path.exists(path):
                os.unlink(path)

        entry = {"name": name, "kind": kind, "step": step, "count": count,
                 "image_size": size, "request_size": REQ, "queue_depth": 1,
                 "samples": samples, "errors": errors, "verify": verify, "stats": {},
                 "ratios": {}}
        for window in ("loop", "e2e"):
            times = {e: [s[window] for s in samples[e]] for e in engines if samples[e]}
            entry["stats"][window] = {e: dict(summarise(t), iops=count / statistics.median(t))
                                      for e, t in times.items()}
            qf = times.get("qcow2fast")
            # "qemu" in the tables: the faster of the two placements.
            best = min((e for e in QEMU_ENGINES if e in times),
                       key=lambda e: statistics.median(times[e]), default=None)
            entry.setdefault("best_qemu", {})[window] = best
            entry["ratios"][window] = {
                "qcow2fast_vs_qemu": ratio_info(times.get(best), qf),
                "qcow2fast_vs_qemu_unpinned": ratio_info(times.get("qemu"), qf),
                "qcow2fast_vs_qemu_1cpu": ratio_info(times.get("qemu1"), qf),
                "qcow2fast_vs_raw": ratio_info(times.get("raw"), qf),
                "qcow2fast_vs_host": ratio_info(times.get("host"), qf),
            }
        if errors:
            self.failures.append((name, errors))
        self.results.append(entry)
        return entry

    def verify(self, kind, offsets, kept, errors):
        """Check what the engines read and wrote, outside every timed
        window; a failure is recorded in ``errors``.  Returns the checks done."""
        a = self.args
        verify = []
        try:
            if kind == "read" and "qcow2fast" in self.engines and "qcow2fast" not in errors:
                verify.append(verify_reads(self.qcow2fast, self.data_qcow2, self.data_raw,
                                           offsets))
            if kind == "alloc":
                for engine in ("qemu", "qemu1", "qcow2fast"):
                    if engine in kept and engine not in errors:
                        verify.append(f"{engine} image: qemu-img check: "
                                      f"{qemu_check(a.qemu_img, kept[engine])}")
                if "qcow2fast" in kept and "qcow2fast" not in errors:
                    for other, fmt in (("qemu", "qcow2"), ("qemu1", "qcow2"), ("raw", "raw")):
                        if other in kept and other not in errors:
                            qemu_compare(a.qemu_img, kept["qcow2fast"], "qcow2", kept[other], fmt)
                            verify.append(f"qemu-img compare qcow2fast image = {other} image")
            if kind == "overwrite" and not errors:
                verify.append("data image: qemu-img check: "
                              f"{qemu_check(a.qemu_img, self.data_qcow2)}")
                if "raw" in self.engines:
                    qemu_compare(a.qemu_img, self.data_qcow2, "qcow2", self.data_raw, "raw")
                    verify.append("qemu-img compare data image = raw copy (same overwrites)")
                    if "qcow2fast" in self.engines:
                        verify.append(verify_qf_overwrites(self.qcow2fast, a.qemu_img,
                                                           self.data_qcow2, self.data_raw,
                                                           offsets))
                        verify.append("data image: qemu-img check: "
                                      f"{qemu_check(a.qemu_img, self.data_qcow2)}")
        except BenchError as e:
            errors["verify"] = str(e)
            log(f"    VERIFY FAILED: {e}")
        return verify

    def run(self):
        a = self.args
        need = 4 * a.size + 2 * max(a.size, a.counts["alloc4_count"] * REQ,
                                    a.counts["alloc64_count"] * CLUSTER) + 256 * MiB
        self.tmpdir, self.fstype = choose_tmpdir(a.tmpdir, need)
        try:
            self.aio, self.aio_notes = probe_aio(a.qemu_img, self.tmpdir)
            for note in self.aio_notes:
                log("  " + note)
            if self.aio != "io_uring":
                log(f"  NOTE: qemu-img bench -i io_uring failed; using -i {self.aio} "
                    "(slower at QD1: the comparison flatters qcow2fast)")
            log(f"  images in {self.tmpdir} ({self.fstype}); qemu AIO: {self.aio}")
            qemu = Qemu(a.qemu_img, self.aio)
            self.fixed_cost = (qemu_fixed_cost(qemu, self.tmpdir, a.size)
                               if any(e in self.engines for e in QEMU_ENGINES) else [])
            wanted = [s for s in SCENARIOS if not a.only or s[0] in a.only]
            if any(kind != "alloc" for _, kind, _, _ in wanted):
                self.setup_data_image()
            for name, kind, step, key in wanted:
                self.run_scenario(name, kind, step, a.counts[key])
        finally:
            if a.keep:
                log(f"  kept images in {self.tmpdir}")
            else:
                shutil.rmtree(self.tmpdir, ignore_errors=True)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.io_bench",
        description="4 KiB queue-depth-1 I/O: qcow2fast vs qemu-img bench vs raw pread/pwrite.")
    p.add_argument("--quick", action="store_true",
                   help="256 MiB image, fewer requests, 3 runs (about a minute)")
    p.add_argument("--json", metavar="OUT", help="write every sample to this JSON file")
    p.add_argument("--plot", metavar="PNG", help="write the plot here")
    p.add_argument("--runs", type=int, help="runs per configuration (default 5, --quick 3)")
    p.add_argument("--count", type=int,
                   help="requests per configuration, for every scenario (default: per "
                        "scenario, see MODES in the source)")
    p.add_argument("--size", type=parse_size,
                   help="virtual size of the data image, e.g. 1G (default 1G, --quick 256M)")
    p.add_argument("--only", action="append", choices=[s[0] for s in SCENARIOS],
                   help="run only this scenario (repeatable)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma-separated subset of " + ",".join(ENGINES) + " (default: all; "
                        "qemu1 = qemu-img pinned to one CPU)")
    p.add_argument("--tmpdir", help="directory for the images (default: $TMPDIR, /var/tmp, "
                                    "/tmp; never tmpfs)")
    p.add_argument("--keep", action="store_true", help="keep the images")
    p.add_argument("--qemu-img", default=shutil.which("qemu-img") or "qemu-img",
                   help="qemu-img binary")
    a = p.parse_args(argv)
    a.mode = "quick" if a.quick else "full"
    mode = MODES[a.mode]
    a.runs = a.runs or mode["runs"]
    a.size = a.size or mode["size"]
    a.counts = {k: (a.count or v or a.size // DERIVED_COUNT[k])
                for k, v in mode.items() if k.endswith("_count")}
    a.engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = [e for e in a.engines if e not in ENGINES]
    if bad or not a.engines:
        p.error(f"--engines: unknown {bad}; choose from {','.join(ENGINES)}")
    a.engines = [e for e in ENGINES if e in a.engines]      # fixed column order
    if a.runs < 1 or (a.count is not None and a.count < 1):
        p.error("--runs and --count must be at least 1")
    if a.size % CLUSTER or a.size < 16 * MiB:
        p.error(f"--size must be a multiple of {human(CLUSTER)} and at least 16M")
    if not shutil.which(a.qemu_img):
        p.error(f"{a.qemu_img} not found (Debian: apt-get install qemu-utils)")
    return a


def main(argv=None):
    a = parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    qcow2fast = None
    if "qcow2fast" in a.engines:
        try:
            import qcow2fast
        except Exception as e:
            log(f"io_bench: cannot import qcow2fast ({type(e).__name__}: {e}); build it "
                "first: python setup.py build_ext --inplace (or pip install -e .)")
            return 1
        for attr in ("open",):
            if not hasattr(qcow2fast, attr):
                log(f"io_bench: qcow2fast has no {attr}() yet (see docs/API.md)")
                return 1
    bench = IoBench(a, qcow2fast)
    t0 = time.perf_counter()
    log(f"io_bench ({a.mode}): engines {', '.join(a.engines)}")
    try:
        bench.run()
    except BenchError as e:
        log(f"io_bench: {e}")
        return 1
    report(bench)
    print(f"\ntotal time {time.perf_counter() - t0:.0f} s", file=sys.stdout)
    if a.plot:
        plot(bench, a.plot)
    if a.json:
        write_json(bench, a.json, started)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
