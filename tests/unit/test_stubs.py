"""The .pyi stubs of the compiled modules (qcow2fast/_ext) match the modules
as built: mypy's stubtest imports each one and compares every name and
signature with its stub, so a stub that drifts from its .pyx fails here."""

import importlib.machinery
import os
import subprocess
import sys

import qcow2fast

PKG = os.path.dirname(os.path.abspath(qcow2fast.__file__))
ROOT = os.path.dirname(PKG)
EXT = os.path.join(PKG, "_ext")
ALLOWLIST = os.path.join(EXT, "stubtest-allowlist.txt")


def compiled_modules():
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted({name.split(".")[0] for name in os.listdir(EXT) if name.endswith(suffixes)})


def test_every_compiled_module_has_a_stub():
    modules = compiled_modules()
    assert modules, f"no compiled modules in {EXT}: build them first"
    missing = [m for m in modules if not os.path.exists(os.path.join(EXT, m + ".pyi"))]
    assert not missing, f"compiled modules without a .pyi stub: {missing}"
    assert os.path.exists(os.path.join(PKG, "py.typed"))


def test_stubs_match_compiled_modules():
    # The stubs and the modules checked are those of the qcow2fast imported
    # here: stubtest runs from the directory holding that package, with it
    # first on the path.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "mypy.stubtest", "--allowlist", ALLOWLIST]
    cmd += [f"qcow2fast._ext.{m}" for m in compiled_modules()]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "error" not in out.lower(), out
    assert "Success: no issues found" in out, out
