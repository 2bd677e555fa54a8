"""What one fleet job is, what it gives back, and the function a worker
runs for it.

A job is a picklable description (paths and the keyword arguments of
:func:`qcow2fast.convert`); the worker function runs the library's own
convert or check on it and always returns a :class:`Record`: an error is
caught and described in the record, so one bad image never stops the
others."""

from __future__ import annotations

import dataclasses
import inspect
import os
import socket
import time
from typing import Any, Mapping, Sequence

from ..errors import InvalidArgumentError, Qcow2Error
from ..ops.convert import convert

# The keyword arguments of convert() a job may carry (``progress`` is the
# fleet's own, per image).
CONVERT_OPTIONS = frozenset(inspect.signature(convert).parameters) - {"sources", "dest",
                                                                      "progress"}
REPAIR_MODES = (None, "leaks", "all")


@dataclasses.dataclass(frozen=True)
class ConvertJob:
    """Convert ``source`` (a path, or several concatenated) into
    ``destination``; ``options`` are :func:`qcow2fast.convert`'s keyword
    arguments (``format``, ``options``, ``compress``, ``sparse_size``, ...)."""

    source: str | tuple[str, ...]
    destination: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.source, (list, tuple)):
            object.__setattr__(self, "source", tuple(os.fspath(s) for s in self.source))
        else:
            object.__setattr__(self, "source", os.fspath(self.source))
        object.__setattr__(self, "destination", os.fspath(self.destination))
        unknown = sorted(set(self.options) - CONVERT_OPTIONS)
        if unknown:
            raise InvalidArgumentError(f"convert job {self.destination!r}: unknown option "
                                       f"{unknown[0]!r} (convert takes: "
                                       f"{', '.join(sorted(CONVERT_OPTIONS))})")
        object.__setattr__(self, "options", dict(self.options))

    @property
    def sources(self) -> tuple[str, ...]:
        return self.source if isinstance(self.source, tuple) else (self.source,)


@dataclasses.dataclass
class Record:
    """The outcome of one job.

    ``status``: convert ``"ok"`` or ``"failed"``; check ``"clean"``,
    ``"leaks"``, ``"corrupt"`` or ``"failed"`` (the check could not run to
    its end).  ``exit_status`` is what qemu-img convert/check would exit
    with for this image.  Sizes are the files' sizes in bytes (None when
    there is no such file); ``check`` holds qemu-img check --output=json's
    members."""

    operation: str
    path: str                           # the destination, or the checked image
    status: str
    exit_status: int
    seconds: float = 0.0
    source: str | None = None
    source_bytes: int | None = None
    bytes: int | None = None
    error: str | None = None
    check: dict | None = None
    worker: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _file_bytes(paths: Sequence[str]) -> int | None:
    try:
        return sum(os.stat(p).st_size for p in paths)
    except OSError:
        return None


def describe(e: BaseException) -> str:
    """One line saying what went wrong, as the CLI would."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, Qcow2Error):
        return str(e)
    return f"{type(e).__name__}: {e}"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_convert(job: ConvertJob) -> Record:
    """Convert one image (in a worker); never raises for the image's sake."""
    rec = Record("convert", job.destination, "ok", 0, source=" ".join(job.sources),
                 source_bytes=_file_bytes(job.sources), worker=worker_name())
    t0 = time.perf_counter()
    try:
        convert(list(job.sources), job.destination, **job.options)
    except Exception as e:          # noqa: BLE001 - reported in the record
        rec.status, rec.exit_status, rec.error = "failed", 1, describe(e)
    rec.seconds = time.perf_counter() - t0
    rec.bytes = _file_bytes([job.destination])
    return rec


# qemu-img check's exit statuses (63: not a format that has checks).
CHECK_STATUS = {0: "clean", 1: "failed", 2: "corrupt", 3: "leaks", 63: "failed"}


def run_check(path: str, repair: str | None = None) -> Record:
    """Check (and with ``repair`` "leaks" or "all", repair) one qcow2 image
    as ``qemu-img check [-r MODE]`` does; never raises for the image's sake."""
    from ..fsck.repair import check_and_repair
    from ..cli.check_cmd import check_json
    from ..host.lock import Holder
    from ..engine.backing import probe_format
    path = os.fspath(path)
    rec = Record("check", path, "failed", 1, worker=worker_name())
    t0 = time.perf_counter()
    try:
        if probe_format(path) != "qcow2":
            rec.exit_status, rec.error = 63, "This image format does not support checks"
            return rec
        # Held for the whole check, which opens the file several times.
        with Holder(path, "qcow2", bool(repair)):
            result = check_and_repair(path, repair)
        rec.check = check_json(result, path)
        if result.failed or result.check_errors:
            rec.error = f"Check failed{': ' + result.failed if result.failed else ''}"
        rec.exit_status = 1 if rec.error else 2 if result.corruptions else \
            3 if result.leaks else 0
    except Exception as e:          # noqa: BLE001 - reported in the record
        rec.error = describe(e)
    finally:
        rec.status = CHECK_STATUS.get(rec.exit_status, "failed")
        rec.seconds = time.perf_counter() - t0
        rec.bytes = _file_bytes([path])
    return rec
