"""The engines of the I/O benchmarks: ``qemu-img bench`` as a process, and
the timed Python request loops of qcow2fast and of the raw file (the
limit a Python caller sees).  io_bench.py says what each window means."""

import bisect
import gc
import json
import os
import subprocess
import time

from .common import BenchError, run
from .io_config import REQ, RUN_RE, SEND_RE, WRITE_PATTERN


class Phases:
    """The phases of one timed sample, with the garbage collector off:
    call the object at the end of each phase.  ``times``: each phase's
    seconds by name, and "e2e", the whole."""

    def __init__(self, *names):
        self.names = names

    def __enter__(self):
        gc.disable()
        self.stamps = [time.perf_counter()]
        return self

    def __call__(self):
        self.stamps.append(time.perf_counter())

    def __exit__(self, *exc):
        gc.enable()

    @property
    def times(self):
        t = {n: b - a for n, a, b in zip(self.names, self.stamps, self.stamps[1:])}
        t["e2e"] = self.stamps[-1] - self.stamps[0]
        return t


class Qemu:
    def __init__(self, qemu_img, aio):
        self.qemu_img = qemu_img
        self.aio = aio

    def command(self, path, count, step, write):
        cmd = [self.qemu_img, "bench", "-f", "qcow2", "-c", str(count), "-d", "1",
               "-s", str(REQ), "-S", str(step), "-o", "0", "-i", self.aio, "-t", "writeback"]
        if write:
            cmd += ["-w", f"--pattern={WRITE_PATTERN}"]
        return cmd + [path]

    def bench(self, path, count, step, write, cpu=None):
        """Returns {"loop": qemu's own time, "e2e": process wall time}.  With
        ``cpu``, qemu-img (and so its io_uring worker threads) runs on that
        CPU only."""
        cmd = self.command(path, count, step, write)
        pin = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pin)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
        sent = SEND_RE.search(p.stdout)
        done = RUN_RE.search(p.stdout)
        if not sent or not done:
            raise BenchError(f"unexpected qemu-img bench output:\n{p.stdout}{p.stderr}")
        want = (count, "write" if write else "read", REQ, 1, 0, step)
        got = (int(sent[1]), sent[2], int(sent[3]), int(sent[4]), int(sent[5]), int(sent[6]))
        if got != want:
            raise BenchError(f"qemu-img bench ran {got}, expected {want}")
        return {"loop": float(done[1]), "e2e": wall}


def qf_requests(qcow2fast, path, offsets, buf, write):
    """qcow2fast: open, the request loop (Image.readinto or Image.write of
    ``buf`` at each offset), a flush after writes, close; each timed."""
    with Phases("open", "loop", *(("flush",) if write else ()), "close") as t:
        img = qcow2fast.open(path, "r+" if write else "r", cache_mode="writeback")
        t()
        call = img.write if write else img.readinto
        for off in offsets:
            call(off, buf)
        t()
        if write:
            img.flush()
            t()
        img.close()
        t()
    return t.times


def raw_requests(path, offsets, buf, write):
    """The raw file: the same with os.pwrite / os.preadv and fdatasync."""
    arg = buf if write else [buf]
    with Phases("open", "loop", *(("flush",) if write else ()), "close") as t:
        fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
        t()
        call = os.pwrite if write else os.preadv
        for off in offsets:
            call(fd, arg, off)
        t()
        if write:
            os.fdatasync(fd)
            t()
        os.close(fd)
        t()
    return t.times


def qf_read(qcow2fast, path, offsets, buf):
    return qf_requests(qcow2fast, path, offsets, buf, False)


def qf_write(qcow2fast, path, offsets, data):
    return qf_requests(qcow2fast, path, offsets, data, True)


def host_map(qemu_img, path):
    """Guest -> host offset function of a fully allocated image, from
    ``qemu-img map --output=json`` (the oracle, not qcow2fast)."""
    extents = json.loads(run([qemu_img, "map", "--output=json", "-f", "qcow2", path]).stdout)
    starts, ext = [], []
    for e in extents:
        if e.get("data") and e.get("offset") is not None and e.get("depth", 0) == 0:
            starts.append(e["start"])
            ext.append((e["start"], e["length"], e["offset"]))

    def to_host(off):
        i = bisect.bisect_right(starts, off) - 1
        if i < 0 or not ext[i][0] <= off < ext[i][0] + ext[i][1]:
            raise BenchError(f"guest offset {off:#x} of {path} is not allocated data")
        start, length, host = ext[i]
        if off + REQ > start + length:
            raise BenchError(f"request at {off:#x} crosses a host extent boundary")
        return host + off - start
    return to_host
