"""The request loop of ``qcow2fast bench`` (qemu-img bench's, on a
qcow2fast image): ``count`` requests of ``size`` bytes, ``depth`` in flight
(spread over one worker thread per usable CPU, each keeping its share in
flight as batches through the batched path, _ext/batch.pyx: resolved and
issued together in C, with io_uring where the kernel has it; ``threads=True``
instead runs one worker thread per request in flight), an
optional flush every ``flush_interval`` requests, and the latency of every
request (with batches, its batch's).

Request ``i`` goes to ``offsets[i]`` and is a write if ``writes[i]``.
Offsets follow qemu-img bench (``offset + i * step``, wrapping at the image
size) unless random ones are asked for.
"""

import dataclasses
import os
import threading
import time

import numpy as np

from .._ext.batch import timed_batches
from .._ext.reqloop import timed_requests
from ..errors import InvalidArgumentError

MAX_THREADS = 128            # workers at most, whatever the depth


@dataclasses.dataclass
class BenchResult:
    count: int
    size: int
    elapsed: float           # seconds, first request issued to last completed
    latencies_ns: np.ndarray

    @property
    def iops(self):
        return self.count / self.elapsed if self.elapsed > 0 else float("inf")

    @property
    def bandwidth(self):
        """Bytes per second."""
        return self.count * self.size / self.elapsed if self.elapsed > 0 else float("inf")

    def percentile_us(self, p):
        if not len(self.latencies_ns):
            return 0.0
        return float(np.percentile(self.latencies_ns, p)) / 1000


def sequential_offsets(count, offset, step, image_size):
    """qemu-img bench's offsets: ``offset`` itself (even past the end: that
    request fails), then ``+ step`` modulo the image size."""
    offs = offset + np.arange(count, dtype=np.int64) * step
    if image_size > 0:
        offs[1:] %= image_size
    return offs


def random_offsets(count, size, image_size, seed):
    """Offsets aligned to ``size``, uniform over the image, reproducible by ``seed``."""
    slots = image_size // size if size else 0
    if slots <= 0:
        raise InvalidArgumentError(f"request size {size} does not fit in the image "
                                   f"({image_size} bytes)")
    return np.random.default_rng(seed).integers(0, slots, count, dtype=np.int64) * size


def write_mask(count, write_percent, seed):
    """Which requests write: all, none, or a reproducible ``write_percent`` mix."""
    if write_percent >= 100:
        return np.ones(count, dtype=bool)
    if write_percent <= 0:
        return np.zeros(count, dtype=bool)
    return np.random.default_rng(seed + 1).random(count) < write_percent / 100


def run(img, offsets, writes, size, *, depth=1, pattern=0, flush_interval=0, drain=True,
        threads=False):
    """Issue the requests; returns a BenchResult.  Raises the first error a
    request met (the others stop within a few requests).

    ``depth`` requests are kept in flight by worker threads: for a qcow2
    image, one per CPU this process may run on (at most ``depth``), each
    keeping its share of the depth in flight as batches through the batch
    engine, with the GIL released for its whole loop; with ``threads`` (or
    an image without the batch engine), one thread per request in flight,
    each issuing its requests one by one."""
    count = len(offsets)
    batched = depth > 1 and not threads and hasattr(img, "submit")
    if batched:
        workers = max(1, min(depth, count, len(os.sched_getaffinity(0))))
        share = [depth // workers + (w < depth % workers) for w in range(workers)]
    else:
        workers = max(1, min(depth, count, MAX_THREADS))
        share = [1] * workers
    lat = np.zeros(count, dtype=np.int64)
    offs = np.ascontiguousarray(offsets, dtype=np.int64)
    wr = np.ascontiguousarray(writes, dtype=bool).view(np.uint8)
    interval = flush_interval or count or 1
    segments = [(a, min(a + interval, count)) for a in range(0, count, interval)]
    data = bytes([pattern]) * size
    errors = []
    stop = bytearray(1)         # set by the batched worker that fails: the others stop
    barrier = threading.Barrier(workers) if workers > 1 else None
    # The request buffers, made (and their pages touched) before the clock
    # starts, as qemu-img bench allocates its own: fresh pages fault in,
    # at a cost of their own (20 MiB at depth 64: ~25 ms in this VM).
    worker_bufs = [[bytearray(size) for _ in range(share[w])] for w in range(workers)]

    def worker(w):
        # Worker w takes requests w, w + workers, ...: in qemu-img bench's
        # order overall.  Its latencies go to a private array (no cache
        # line shared with the other workers) and then into lat.
        bufs = worker_bufs[w]
        try:
            for a, b in segments:
                mine = slice(a + w, b, workers)
                mine_offs = np.ascontiguousarray(offs[mine])
                mine_lat = np.zeros(len(mine_offs), dtype=np.int64)
                if batched:
                    done = timed_batches(img, mine_offs, np.ascontiguousarray(wr[mine]),
                                         bufs, data, share[w], mine_lat, stop)
                else:
                    done = timed_requests(img.readinto, img.write, mine_offs, wr[mine],
                                          bufs[0], data, mine_lat, errors)
                lat[mine] = mine_lat
                if done < len(mine_lat):
                    return
                if flush_interval:
                    if drain and barrier is not None:
                        barrier.wait()
                    if w == 0:
                        img.flush()
                    if drain and barrier is not None:
                        barrier.wait()
        except threading.BrokenBarrierError:
            return
        except BaseException as e:          # reported by the caller
            errors.append(e)
            if barrier is not None:
                barrier.abort()

    t0 = time.perf_counter()
    if workers == 1:
        worker(0)
    else:
        pool = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(workers)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return BenchResult(count, size, elapsed, lat)
