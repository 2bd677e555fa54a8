"""The quick seeded set of the fuzzer (tests/hardening/fuzzer.py; long
runs: scripts/fuzz.py): mutated qemu-made images through open, read,
block_status, check, check -r all and convert, and mutated client streams
through the NBD server, each input in a bounded child (1 GiB address
space, a timeout).  Any crash, hang, unbounded allocation, error that is
not a Qcow2Error/OSError, or write to an image opened read-only fails.
The fuzzer runs in a fresh process (it forks one child per input)."""

import json
import os
import subprocess
import sys

import pytest

from tests.hardening import fuzzer
from tests.helpers.qemu_util import REPO, require_qemu

pytestmark = pytest.mark.qemu

EXECUTIONS = 25


@pytest.mark.parametrize("target", fuzzer.TARGETS)
def test_seeded_fuzz(target):
    require_qemu()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "tests.hardening.fuzzer", target,
                        str(EXECUTIONS), "2026"], capture_output=True, env=env, cwd=REPO,
                       timeout=900)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    res = json.loads(p.stdout.decode().splitlines()[-1])
    assert res["executions"] == EXECUTIONS
    assert not res["nfindings"], "\n\n".join(f"{r['outcome']}: {r.get('error', '')[-1500:]}"
                                              for r in res["findings"])
    if target != "nbd":     # the inputs reach past the header checks, not only into them
        assert res["outcomes"].get("completed", 0) > 0, res["outcomes"]
