"""The quick benchmark suite as a smoke test: every scenario runs both
engines, verifies what they wrote, and produces non-empty results."""

import json
import subprocess
import sys

import pytest

from benchmarks.suite import NAMES, SCENARIOS

pytestmark = pytest.mark.qemu


def _numbers(doc):
    if isinstance(doc, dict):
        for v in doc.values():
            yield from _numbers(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _numbers(v)
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        yield doc


def test_quick_suite(tmp_path):
    # Through the CLI alias, from outside the repository: the suite and its
    # scenario processes must find benchmarks/ on their own.
    p = subprocess.run([sys.executable, "-m", "qcow2fast", "bench-suite", "--quick",
                        "--out", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "FAILED" not in report
    for name in NAMES:
        assert f"## {name}" in report
        text = (tmp_path / f"{name}.json").read_text()
        assert "qcow2fast" in text and "qemu" in text, name
        numbers = list(_numbers(json.loads(text)))
        assert numbers and any(n > 0 for n in numbers), name
    for name, _, _, plots in SCENARIOS:
        if plots:
            assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name
    # jitter counts the syncs (strace): writethrough syncs on every write,
    # unsafe never.
    syncs = {(r["cache"], r["lazy_refcounts"]): r["syncs_per_write"]
             for r in json.loads((tmp_path / "jitter.json").read_text())["results"]}
    for engine in ("qemu", "qcow2fast"):
        assert syncs[("writethrough", False)][engine] >= 1, syncs
        assert syncs[("unsafe", False)][engine] == 0, syncs
