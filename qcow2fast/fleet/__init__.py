"""Fleet operations: convert or check many images on any
:class:`concurrent.futures.Executor` -- a local process pool by default, or
a Dask cluster's (``dask.distributed.Client(address).get_executor()``, see
:func:`qcow2fast.fleet.executor.dask_executor`).

    from qcow2fast.fleet import ConvertJob, convert_many, check_many
    jobs = [ConvertJob(f"in/{n}.raw", f"out/{n}.qcow2", {"compress": True}) for n in names]
    records = convert_many(jobs)                    # one Record per job, in order
    checks = check_many([j.destination for j in jobs], repair="leaks")

Jobs go to the workers as picklable descriptions and each worker runs the
library's own convert and check (jobs.py); every job gives a Record, an
error included (a failing image, or a worker lost), so one bad image
never stops the others.  The paths must be the same on every worker (a
shared filesystem, for a cluster).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError
from .jobs import REPAIR_MODES, ConvertJob, Record, describe, run_check, run_convert

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any

__all__ = ["ConvertJob", "Record", "convert_many", "check_many", "as_job"]


def as_job(job: ConvertJob | Mapping[str, Any]) -> ConvertJob:
    """A ConvertJob from a ConvertJob or a mapping with ``source``,
    ``destination`` (or ``dest``) and convert's keyword arguments."""
    if isinstance(job, ConvertJob):
        return job
    spec = dict(job)
    try:
        source = spec.pop("source")
        dest = spec.pop("destination") if "destination" in spec else spec.pop("dest")
    except KeyError as e:
        raise InvalidArgumentError(f"convert job {job!r}: {e.args[0]!r} is missing") from None
    return ConvertJob(source, dest, spec)


def convert_many(jobs: Iterable[ConvertJob | Mapping[str, Any]],
                 executor: concurrent.futures.Executor | None = None,
                 progress: Callable[[Record], object] | None = None) -> list[Record]:
    """Run every convert job on ``executor`` (default: a process pool of
    one worker per CPU); returns their Records in the jobs' order.
    ``progress(record)`` is called as each job ends.  A job without
    ``threads`` gets the CPUs' share of one worker (_threads_per_job)."""
    jobs = [as_job(j) for j in jobs]
    with _executor(executor, len(jobs)) as ex:
        threads = _threads_per_job(ex)
        jobs = [j if "threads" in j.options else
                ConvertJob(j.source, j.destination, {**j.options, "threads": threads})
                for j in jobs]
        return _run(run_convert, [(j,) for j in jobs],
                    [Record("convert", j.destination, "failed", 1, source=" ".join(j.sources))
                     for j in jobs], ex, progress)


@contextlib.contextmanager
def _executor(executor, njobs):
    """``executor``, or a local process pool (one worker per CPU, at most
    one per job) shut down on exit."""
    if executor is not None:
        yield executor
        return
    pool = concurrent.futures.ProcessPoolExecutor(min(njobs, os.cpu_count() or 1) or 1)
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def _threads_per_job(executor):
    """convert()'s threads for a job that does not say: the CPUs shared
    among a local process pool's workers, else 1 (a Dask worker runs as
    many jobs at once as it has threads, sized to the cores already).
    convert's own default, a thread per CPU in every worker, would run
    workers x CPUs threads on the CPUs."""
    workers = getattr(executor, "_max_workers", None)
    if isinstance(executor, concurrent.futures.ProcessPoolExecutor) and workers:
        return max(1, (os.cpu_count() or 1) // workers)
    return 1


def check_many(paths: Iterable[str | os.PathLike[str]],
               executor: concurrent.futures.Executor | None = None,
               repair: str | None = None,
               progress: Callable[[Record], object] | None = None) -> list[Record]:
    """Check every qcow2 image in ``paths`` as ``qemu-img check [-r
    repair]`` does ("leaks", "all" or None: read-only), on ``executor``;
    returns their Records in order.  ``progress(record)`` as each ends."""
    if repair not in REPAIR_MODES:
        raise InvalidArgumentError(f"repair must be 'leaks', 'all' or None, not {repair!r}")
    paths = [os.fspath(p) for p in paths]
    with _executor(executor, len(paths)) as ex:
        return _run(run_check, [(p, repair) for p in paths],
                    [Record("check", p, "failed", 1) for p in paths], ex, progress)


def _run(fn, args, placeholders, executor, progress):
    """fn(*a) for each a on the executor, in any order; a job whose worker
    fails (a pickling error, a worker process lost) gets its placeholder
    record with the error."""
    records = list(placeholders)
    futures = {executor.submit(fn, *a): i for i, a in enumerate(args)}
    for future in concurrent.futures.as_completed(futures):
        i = futures[future]
        try:
            records[i] = future.result()
        except Exception as e:      # noqa: BLE001 - the worker's failure, recorded
            records[i].error = f"worker failed: {describe(e)}"
        if progress is not None:
            progress(records[i])
    return records
