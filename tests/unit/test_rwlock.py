"""The image lock (csrc/qf_rwlock.h) under contention: built with the C
compiler the package is built with and run for a second -- readers and
writers, waiting and trying, on more threads than CPUs.  No reader may see
a writer's change half made, and every kind of holder gets the lock."""

import os
import subprocess
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readers_never_see_a_write_half_made(tmp_path):
    exe = tmp_path / "rwlock_stress"
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    subprocess.run([*cc, "-O2", "-pthread", "-I", str(ROOT / "csrc"),
                    str(Path(__file__).with_name("rwlock_stress.c")), "-o", str(exe)],
                   check=True)
    p = subprocess.run([str(exe), "1000"], capture_output=True, text=True, timeout=60,
                       env={**os.environ})
    assert p.returncode == 0, p.stdout + p.stderr
    counts = dict(zip(p.stdout.split()[::2], map(int, p.stdout.split()[1::2])))
    assert counts["torn"] == 0 and counts["a"] == counts["b"] > 0
