"""qcow2fast fleet convert|check --manifest FILE [--scheduler tcp://HOST:PORT|local]
[-j N] [-r leaks|all] [-p] [-q] [--json FILE]

Many images converted or checked at once on a local process pool (``-j``
workers, default one per CPU) or a Dask cluster (``--scheduler``, the
optional extra ``qcow2fast[dask]``), with a progress bar and a summary
table; exit status 1 if any image failed (check: any image not clean).

The manifest is JSON -- a list (or ``{"jobs": [...]}``) of objects -- or
CSV with a header row.  A convert job has ``source`` and ``destination``
and any keyword argument of :func:`qcow2fast.convert` (``format``,
``compress``, ``sparse_size``, ``options``, ...); ``options`` may be
qemu-img's ``-o`` text (``cluster_size=4k,compression_type=zstd``).  A check
job is a path (a JSON string, or a ``path`` column/key; a convert
manifest's ``destination`` also does).
"""

import csv
import io
import json
import sys
import time

from .create_cmd import qcow2_options
from .options import UsageError, merge_options, parse_bool, cvtnum

NAME = "fleet"
BOOL_OPTIONS = {"compress", "existing", "target_is_zero", "sync", "direct", "force_share",
                "untrusted"}
INT_OPTIONS = {"threads", "compression_level"}


def add_parser(sub):
    p = sub.add_parser(NAME, help="convert or check many images (a process pool or Dask)")
    p.add_argument("operation", choices=("convert", "check"))
    p.add_argument("--manifest", required=True, help="JSON or CSV list of jobs")
    p.add_argument("--scheduler", default="local",   # fleet.executor.LOCAL (not imported: start-up)
                   help="'local' (a process pool) or a Dask scheduler, tcp://HOST:PORT")
    p.add_argument("-j", dest="workers", type=int, help="local worker processes")
    p.add_argument("-r", dest="repair", choices=("leaks", "all"), help="check: repair")
    p.add_argument("-p", dest="progress", action="store_true", help="always draw the bar")
    p.add_argument("-q", dest="quiet", action="store_true", help="no bar, no table")
    p.add_argument("--json", dest="json_out", help="write every record to this file (JSON)")
    p.set_defaults(run=run)


def run(args):
    from ..fleet import check_many, convert_many
    from ..fleet.executor import LOCAL, FleetExecutor

    if args.workers is not None and (args.workers < 1 or args.scheduler != LOCAL):
        raise UsageError("fleet: -j N (N >= 1) sets the local pool's size "
                         "(a Dask cluster has its own workers)")
    if args.repair and args.operation != "check":
        raise UsageError("fleet: -r is for check")
    entries = load_manifest(args.manifest)
    jobs = [convert_job(e, args.manifest, i) if args.operation == "convert"
            else check_path(e, args.manifest, i) for i, e in enumerate(entries, 1)]
    bar = _bar(len(jobs), args)
    t0 = time.perf_counter()
    try:
        with FleetExecutor(args.scheduler, args.workers) as executor:
            if args.operation == "convert":
                records = convert_many(jobs, executor, progress=bar)
            else:
                records = check_many(jobs, executor, args.repair, progress=bar)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump([r.as_dict() for r in records], f, indent=2)
    if not args.quiet:
        print(summary(records, wall), end="")
    return 0 if all(r.ok for r in records) else 1


class _bar:
    """tqdm over the images (stderr, when a terminal or -p); called with
    each record as it ends."""

    def __init__(self, total, args):
        self.tqdm = None
        if not args.quiet and (args.progress or sys.stderr.isatty()):
            from tqdm import tqdm
            self.tqdm = tqdm(total=total, desc=f"fleet {args.operation}", unit="image",
                             file=sys.stderr)
        self.failed = 0

    def __call__(self, record):
        self.failed += not record.ok
        if self.tqdm is not None:
            self.tqdm.set_postfix(failed=self.failed, refresh=False)
            self.tqdm.update(1)

    def close(self):
        if self.tqdm is not None:
            self.tqdm.close()


# -- the manifest -----------------------------------------------------------------------


def load_manifest(path):
    """The manifest's entries: JSON values, or CSV rows as dicts."""
    try:
        with open(path, newline="") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"fleet: cannot read the manifest {path}: {e.strerror}") from None
    if path.endswith(".json") or text.lstrip()[:1] in ("[", "{"):
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise UsageError(f"fleet: manifest {path}: invalid JSON: {e}") from None
        entries = doc.get("jobs") if isinstance(doc, dict) else doc
        if not isinstance(entries, list):
            raise UsageError(f"fleet: manifest {path}: expected a list of jobs "
                             f"(or {{\"jobs\": [...]}})")
        return entries
    rows = list(csv.DictReader(io.StringIO(text)))
    return [{k.strip(): v.strip() for k, v in row.items() if k and v and v.strip()}
            for row in rows]


def convert_job(entry, manifest, n):
    from ..fleet import as_job
    from ..fleet.jobs import CONVERT_OPTIONS

    where = f"fleet: manifest {manifest}, job {n}"
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: expected an object with source and destination")
    spec = {}
    for key, value in entry.items():
        if key in ("source", "destination", "dest"):
            spec[key] = value
        elif key not in CONVERT_OPTIONS:
            raise UsageError(f"{where}: unknown key {key!r}")
        elif isinstance(value, str):
            spec[key] = _option(key, value, entry, where)
        else:
            spec[key] = value
    try:
        return as_job(spec)
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None


def _option(key, value, entry, where):
    """A convert option given as text (CSV, or ``-o`` text in JSON)."""
    try:
        if key in BOOL_OPTIONS:
            return parse_bool(value, key)
        if key in INT_OPTIONS:
            return int(value)
        if key == "sparse_size":
            return cvtnum("sparse size", value)
        if key == "options":
            opts = merge_options([value])
            return qcow2_options(opts, "convert") if entry.get("format", "qcow2") == "qcow2" \
                else opts
    except ValueError as e:
        raise UsageError(f"{where}: {key}: {e}") from None
    return value


def check_path(entry, manifest, n):
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        for key in ("path", "destination"):
            if isinstance(entry.get(key), str):
                return entry[key]
    raise UsageError(f"fleet: manifest {manifest}, job {n}: expected a path (a string, or "
                     f"a 'path' key)")


# -- the summary ------------------------------------------------------------------------


def summary(records, wall):
    """A table by status (images, bytes in and out, worker seconds), the
    throughput, then each failed image with its error."""
    order = ["ok", "clean", "leaks", "corrupt", "failed"]
    statuses = sorted({r.status for r in records}, key=order.index)
    rows = [("status", "images", "in MiB", "out MiB", "worker s")]
    for status in statuses + ["total"]:
        rs = [r for r in records if status in ("total", r.status)]
        rows.append((status, str(len(rs)), _mib(r.source_bytes for r in rs),
                     _mib(r.bytes for r in rs), f"{sum(r.seconds for r in rs):.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    moved = sum(r.source_bytes or 0 for r in records) or sum(r.bytes or 0 for r in records)
    lines.append(f"{len(records)} images in {wall:.1f} s: {len(records) / wall:.1f} images/s, "
                 f"{moved / wall / (1 << 20):.1f} MiB/s")
    for r in records:
        if not r.ok:
            what = f"{r.source} -> {r.path}" if r.source else r.path
            lines.append(f"{r.status}: {what}: {r.error or 'exit status %d' % r.exit_status}")
    return "\n".join(lines) + "\n"


def _mib(sizes):
    sizes = [s for s in sizes if s is not None]
    return f"{sum(sizes) / (1 << 20):.1f}" if sizes else "-"
