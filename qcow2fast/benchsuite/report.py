"""Reporting for io_bench: the side-by-side tables and the JSON file."""

import json
import os
import platform
import statistics
import sys
import time

from .common import git_revision, human, log, run
from .io_config import (CLUSTER, ENGINE_LABEL, ENGINES, FILL_PATTERN, QEMU_ENGINES, REQ,
                        SCATTER_STEP, WRITE_PATTERN)

# -- reporting -------------------------------------------------------------------------------


def md_table(header, rows, out=sys.stdout):
    """Print a Markdown table."""
    print("| " + " | ".join(header) + " |", file=out)
    print("|" + "---|" * len(header), file=out)
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |", file=out)


def panels(n, width=4.2, height=3.6):
    """A figure of ``n`` side-by-side panels (matplotlib, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def save_figure(fig, path, legend=None):
    """Write the figure; with ``legend`` (an axis), that axis's legend goes
    below the panels, in one row."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    for ax in fig.axes:
        ax.xaxis.set_minor_formatter(NullFormatter())     # no crowded log-scale labels
    if legend is None:
        fig.tight_layout()
    else:
        handles, labels = legend.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_groups(ax, groups, series, ylabel, title, log=False):
    """Grouped bars on ``ax``: one group per label in ``groups``, one bar a
    group per ``(label, samples)`` in ``series``, ``samples[i]`` being the
    list of samples of group i (empty or None: no bar).  Bar height is the
    median, the error bar spans min to max (none for single samples).
    ``log``: True, False, or "auto" (log when the values span over 20x)."""
    import numpy as np
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    values = [v for _, samples in series for s in samples if s for v in s]
    if log == "auto":
        log = bool(values) and min(values) > 0 and max(values) > 20 * min(values)
    for i, (label, samples) in enumerate(series):
        idx = [j for j, s in enumerate(samples) if s]
        if not idx:
            continue
        med = np.array([statistics.median(samples[j]) for j in idx])
        err = [med - [min(samples[j]) for j in idx], [max(samples[j]) for j in idx] - med]
        spread = any(len(samples[j]) > 1 for j in idx)
        ax.bar(x[idx] + (i - (len(series) - 1) / 2) * width, med, width,
               yerr=err if spread else None,
               capsize=2, label=label, error_kw={"elinewidth": 0.8})
    ax.set_xticks(x, groups)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel + (", log scale" if log else ""))
    ax.set_title(title)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_axisbelow(True)


def rates(count, times):
    """Per-sample rates (``count`` / time) of a list of times."""
    return [count / t for t in times if t > 0]


def fmt_ratio(info):
    if not info:
        return "-"
    return f"{info['ratio']:.2f}x ({info['min']:.2f}-{info['max']:.2f})"


def scenario_label(entry):
    return f"{entry['name']} S={human(entry['step'])}"


def print_table(bench, window, title, kinds, out=sys.stdout):
    rows = [e for e in bench.results if e["kind"] in kinds and e["stats"][window]]
    if not rows:
        return
    head = (f"{'scenario':<27} {'engine':<15} {'median s':>8} {'min s':>7} {'max s':>7} "
            f"{'kIOPS':>6} {'us/req':>6}  {'qf vs qemu*':<19} {'qf vs raw':<19} "
            f"{'qf vs host':<18}")
    print(f"\n{title}", file=out)
    print(head.rstrip(), file=out)
    print("-" * len(head.rstrip()), file=out)
    for e in rows:
        labels = [scenario_label(e), f"  ({e['count']} requests)"]
        for engine in ENGINES:
            if engine not in e["samples"]:
                continue
            label = labels.pop(0) if labels else ""
            st = e["stats"][window].get(engine)
            name = ENGINE_LABEL[engine]
            if window == "loop" and engine in ("raw", "host"):
                name += " " + ("preadv" if e["kind"] == "read" else "pwrite")
            if engine == e["best_qemu"][window] and len(
                    [q for q in QEMU_ENGINES if q in e["stats"][window]]) > 1:
                name += " *"
            if st is None:
                err = e["errors"].get(engine, "no samples")
                print(f"{label:<27} {name:<15} FAILED: {err[:90]}", file=out)
                continue
            ratios = ["", "", ""]
            if engine == "qcow2fast":
                ratios = [fmt_ratio(e["ratios"][window][f"qcow2fast_vs_{other}"])
                          for other in ("qemu", "raw", "host")]
            line = (f"{label:<27} {name:<15} {st['median']:8.3f} {st['min']:7.3f} "
                    f"{st['max']:7.3f} {st['iops'] / 1000:6.1f} "
                    f"{st['median'] / e['count'] * 1e6:6.2f}  {ratios[0]:<19} {ratios[1]:<19} "
                    f"{ratios[2]:<18}")
            print(line.rstrip(), file=out)
        for label in labels:
            print(label, file=out)
        if "verify" in e["errors"]:
            print(f"{'':<27} VERIFY FAILED: {e['errors']['verify'][:100]}", file=out)
    print("* qf vs qemu: against the faster qemu-img placement (marked *): free to use "
          f"every CPU, or pinned to CPU {bench.pin_cpu} (\"1cpu\").", file=out)


def report(bench, out=sys.stdout):
    a = bench.args
    print(f"\nqcow2fast io_bench ({a.mode} mode): 4 KiB requests, queue depth 1, "
          f"{human(CLUSTER)} clusters, cache writeback, {a.runs} runs each, "
          f"qemu-img bench -i {bench.aio}", file=out)
    if bench.aio != "io_uring":
        print("NOTE: -i io_uring failed here, qemu ran with -i threads "
              "(its slower mode).", file=out)
    print(f"images: {bench.tmpdir} ({bench.fstype}), data image {human(a.size)}, page-cached; "
          f"{os.cpu_count()} CPUs, load average {bench.loadavg_start[0]:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end", file=out)
    print_table(bench, "loop", "Request loop only (qemu: its own \"Run completed\" time; "
                "qcow2fast/raw: perf_counter around the loop; no open/flush/close).  "
                "Ratios are IOPS ratios, >1 = qcow2fast faster; (per-run range).",
                ("read", "overwrite", "alloc"))
    print_table(bench, "e2e", "Writes including open + final flush + close "
                "(qemu: wall time of the qemu-img process, so also exec/start-up; "
                "qcow2fast: open+loop+flush()+close(); raw/host: open+loop+fdatasync+close).",
                ("overwrite", "alloc"))
    if bench.fixed_cost:
        print(f"\nqemu-img fixed cost (process with 1 write on a fresh image, wall): median "
              f"{statistics.median(bench.fixed_cost) * 1000:.1f} ms "
              f"(min {min(bench.fixed_cost) * 1000:.1f}, max {max(bench.fixed_cost) * 1000:.1f})"
              " - included in qemu's e2e figures, not subtracted.", file=out)
    short = sorted({e["name"] for e in bench.results for q in QEMU_ENGINES
                    if e["stats"]["loop"].get(q, {}).get("median", 1) < 0.1})
    print("qemu-img bench reports its time with 1 ms resolution"
          + (f"; under 0.1 s in {', '.join(short)}: use a larger --count for precision."
             if short else "."), file=out)
    for e in bench.results:
        for v in e["verify"]:
            print(f"verified [{e['name']}]: {v}", file=out)
    for name, errors in bench.failures:
        for engine, err in errors.items():
            print(f"FAILED [{name}] {engine}: {err}", file=out)


def plot(bench, path):
    """IOPS per scenario and engine (median, min-max bars): the request loop
    for every scenario, then the writes with open + flush + close."""
    fig, axes = panels(2, 6.4, 4.4)
    for ax, window, kinds, title in (
            (axes[0], "loop", ("read", "overwrite", "alloc"),
             "cached 4 KiB requests, QD 1: request loop only"),
            (axes[1], "e2e", ("overwrite", "alloc"),
             "4 KiB writes, QD 1: with open + flush + close")):
        rows = [e for e in bench.results if e["kind"] in kinds]
        series = [(ENGINE_LABEL[engine] + (" pread/pwrite" if engine == "raw" else ""),
                   [rates(e["count"], [s[window] for s in e["samples"].get(engine, [])])
                    for e in rows]) for engine in bench.engines]
        bar_groups(ax, [e["name"] for e in rows], series, "requests / s", title,
                   log=True)
        ax.tick_params(axis="x", labelrotation=20)
    save_figure(fig, path, legend=axes[0])


def write_json(bench, path, started):
    a = bench.args
    rev, dirty = git_revision(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    qf_version = getattr(bench.qcow2fast, "__version__", None) if bench.qcow2fast else None
    qemu_version = run([a.qemu_img, "--version"], check=False).stdout.splitlines()[:1]
    doc = {
        "benchmark": "qcow2fast io_bench",
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": a.mode,
        "config": {
            "runs": a.runs, "counts": a.counts, "data_image_size": a.size,
            "cluster_size": CLUSTER, "request_size": REQ, "queue_depth": 1,
            "scatter_step": SCATTER_STEP, "fill_pattern": FILL_PATTERN,
            "write_pattern": WRITE_PATTERN, "engines": bench.engines,
            "qemu_aio": bench.aio, "qemu_aio_notes": bench.aio_notes,
            "qemu_cache": "writeback", "qcow2fast_cache_mode": "writeback",
            "qemu1_cpu": bench.pin_cpu,
            "tmpdir": bench.tmpdir, "tmpdir_fstype": bench.fstype,
            "offsets": "offset(i) = (i * step) % image_size, i in range(count)",
            "windows": {
                "loop": "qemu: parsed 'Run completed in X seconds.' (excludes open, final "
                        "flush, close); qcow2fast/raw: perf_counter around the request loop",
                "e2e": "qemu: qemu-img process wall time (exec+open+loop+flush+close); "
                       "qcow2fast: open+loop+flush()+close(); raw/host: open+loop+fdatasync+close",
            },
            "ratio": "IOPS ratio qcow2fast/other = median(other time) / median(qcow2fast "
                     "time); min/max over per-run pairs",
        },
        "environment": {
            "python": sys.version, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "loadavg_start": bench.loadavg_start,
            "loadavg_end": os.getloadavg(),
            "qemu_img": qemu_version[0] if qemu_version else None,
            "qcow2fast_version": qf_version, "git_revision": rev, "git_dirty": dirty,
        },
        "qemu_fixed_cost_s": bench.fixed_cost,
        "scenarios": bench.results,
        "failures": [{"scenario": n, "errors": e} for n, e in bench.failures],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    log(f"  wrote {path}")
