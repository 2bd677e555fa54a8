"""The quick benchmark suite as a smoke test: every scenario runs both
engines, verifies what they wrote, and produces non-empty results -- from
a non-editable install of the package, outside the repository."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

import qcow2fast._ext
from benchmarks.suite import NAMES, SCENARIOS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package as a wheel installs it, in a directory of its own: the
    Python files and package data setuptools puts in the wheel (build_py,
    from pyproject.toml) and the extension modules (built in place; building
    them again would take minutes).  Returns the environment that imports
    qcow2fast from there and finds no repository."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(target)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    ext = os.path.dirname(qcow2fast._ext.__file__)
    for so in glob.glob(os.path.join(ext, "*.so")):
        shutil.copy(so, target / "qcow2fast" / "_ext")
    env = dict(os.environ, PYTHONPATH=str(target))
    p = subprocess.run([sys.executable, "-c", "import qcow2fast.benchsuite.suite as s, sys; "
                        "print(s.__file__); import benchmarks"],
                       cwd=target.parent, env=env, capture_output=True, text=True, timeout=60)
    assert p.stdout.startswith(str(target)), p.stdout + p.stderr   # not the repository's
    assert "No module named 'benchmarks'" in p.stderr, p.stderr     # nothing of the clone
    return env


def test_clone_entry():
    """From a clone, ``python -m benchmarks[.NAME]`` runs the package's suite."""
    for module in ("benchmarks", "benchmarks.io_bench"):
        p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "--quick" in p.stdout, p.stderr


def test_quick_suite(tmp_path, installed):
    # Through the CLI alias of an installed package, from outside the
    # repository: the suite and its scenario processes find what they need.
    p = subprocess.run([sys.executable, "-m", "qcow2fast", "bench-suite", "--quick",
                        "--out", str(tmp_path)],
                       cwd=tmp_path, env=installed, capture_output=True, text=True,
                       timeout=900)
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
