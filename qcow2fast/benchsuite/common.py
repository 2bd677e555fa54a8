"""Helpers shared by the benchmark scripts: sizes, logging, the machine and
its filesystems, statistics over repeated runs."""

import argparse
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
# The directory holding the qcow2fast package (a clone's root, or where it
# is installed): child processes get it on PYTHONPATH.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class BenchError(Exception):
    """A benchmark step failed (tool error, bad output, failed verification)."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}")
    mult = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}[m.group(2).lower()]
    return int(m.group(1)) * mult


def human(n):
    for unit, mult in (("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def round_up(n, align):
    return (n + align - 1) // align * align


# -- environment -----------------------------------------------------------------


def qcow2fast_command():
    """The ``qcow2fast`` command as users run it: the console script
    installed beside this Python (``python -m qcow2fast`` costs runpy's
    extra start-up), else ``python -m qcow2fast``; its package byte-compiled
    first, as an installed package is."""
    compile_package()
    script = os.path.join(os.path.dirname(sys.executable), "qcow2fast")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "qcow2fast"]


@functools.cache
def compile_package():
    """Byte-compile the qcow2fast package the commands run from, as pip
    does at install.  Where PYTHONDONTWRITEBYTECODE is set (this sandbox)
    and the tree has no ``__pycache__`` (a clone, an editable install),
    every command would otherwise compile its modules from source first:
    0.1-0.25 s of CPU no installed copy pays.  A read-only tree is left
    as it is."""
    import compileall
    compileall.compile_dir(os.path.join(ROOT, "qcow2fast"), quiet=2)


def timed_command(cmd, stdout=None, cwd=None):
    """(wall seconds, user+sys CPU seconds) of ``cmd`` run to completion in
    ``cwd`` (its children included); a failure is a BenchError."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=stdout or subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {p.returncode}: "
                         f"{p.stderr.decode(errors='replace')[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def fs_type(path):
    """Filesystem type of the mount holding ``path`` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, fstype = mnt, fields[2]
    except OSError:
        pass
    return fstype


def bench_parser(prog, doc, quick_help):
    """The options every side-by-side benchmark takes."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--runs", type=int, help="runs per figure")
    p.add_argument("--json", metavar="OUT", help="write every sample to this JSON file")
    p.add_argument("--plot", metavar="PNG", help="write the plot here")
    p.add_argument("--tmpdir", help="directory for the images (never tmpfs)")
    p.add_argument("--qemu-img", default=shutil.which("qemu-img") or "qemu-img",
                   help="qemu-img binary")
    return p


def parse_mode(p, argv, modes):
    """Parse a scenario's arguments; its ``modes`` entry ("quick" or "full")
    fills size, count and (unless --runs) runs; qemu-img must be there."""
    a = p.parse_args(argv)
    mode = modes["quick" if a.quick else "full"]
    a.size, a.count, a.runs = mode["size"], mode["count"], a.runs or mode["runs"]
    if not shutil.which(a.qemu_img):
        p.error(f"{a.qemu_img} not found (Debian: apt-get install qemu-utils)")
    return a


def scenario_main(a, name, need_bytes, collect, report, plot=None, meta=None, aio=False):
    """The body of a scenario's main(): a scratch directory (removed after),
    ``collect(a, tmpdir)``, then the report, the plot (``a.plot``) and the
    JSON (``a.json``: ``meta`` plus the results).  Returns the exit status."""
    t0 = time.perf_counter()
    try:
        tmpdir, _ = choose_tmpdir(a.tmpdir, need_bytes, prefix=f"qcow2fast-{name}-")
        try:
            if aio:
                from .io_setup import probe_aio
                a.aio, _ = probe_aio(a.qemu_img, tmpdir)
            results = collect(a, tmpdir)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    except BenchError as e:
        log(f"{name}: {e}")
        return 1
    report(results)
    if plot is not None and getattr(a, "plot", None):
        plot(results, a.plot)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**(meta or {}), "results": results}, f, indent=1)
    print(f"\ntotal time {time.perf_counter() - t0:.0f} s")
    return 0


def choose_tmpdir(requested, need_bytes, prefix="qcow2fast-io-bench-"):
    """A directory on a disk filesystem (not tmpfs: the point is a page-cached
    image on a real filesystem) with room for the images."""
    clone = os.path.join(ROOT, "benchmarks")
    candidates = [requested] if requested else [
        os.environ.get("TMPDIR"), "/var/tmp", "/tmp",
        os.path.join(clone, "results") if os.path.isdir(clone) else None]
    problems = []
    for cand in candidates:
        if not cand:
            continue
        try:
            os.makedirs(cand, exist_ok=True)
        except OSError as e:
            problems.append(f"{cand}: {e}")
            continue
        fstype = fs_type(cand)
        free = shutil.disk_usage(cand).free
        if fstype in ("tmpfs", "ramfs"):
            problems.append(f"{cand}: on {fstype}")
            if requested:
                raise BenchError(f"--tmpdir {cand} is on {fstype}; use a disk filesystem")
            continue
        if free < need_bytes:
            problems.append(f"{cand}: {free / GiB:.1f} GiB free, need {need_bytes / GiB:.1f}")
            continue
        return tempfile.mkdtemp(prefix=prefix, dir=cand), fstype
    raise BenchError("no suitable temporary directory: " + "; ".join(problems))


def run(cmd, check=True):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p


def git_revision(repo):
    p = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True)
    rev = p.stdout.strip() if p.returncode == 0 else None
    p = subprocess.run(["git", "-C", repo, "status", "--porcelain"], capture_output=True, text=True)
    dirty = bool(p.stdout.strip()) if p.returncode == 0 else None
    return rev, dirty


# -- statistics ----------------------------------------------------------------------


def summarise(samples):
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def ratio_info(base, qf):
    """Speed ratio (IOPS ratio) qcow2fast/base: median(base) / median(qf),
    with the range of the per-run paired ratios."""
    if not base or not qf:
        return None
    pairs = [b / q for b, q in zip(base, qf) if q > 0]
    med_q = statistics.median(qf)
    if med_q <= 0 or not pairs:
        return None
    return {"ratio": statistics.median(base) / med_q, "min": min(pairs), "max": max(pairs)}
