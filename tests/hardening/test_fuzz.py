"""The quick seeded set of the fuzzer (tests/hardening/fuzzer.py; long
runs: scripts/fuzz.py): mutated qemu-made images through open, read,
block_status, check, check -r all, convert, the lifecycle operations
(snapshots, resize, amend) and the chain ones (commit into the image, a
safe rebase of it, its bitmaps), and mutated client streams
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
    if target not in ("nbd", "names"):  # the inputs reach past the header checks
        assert res["outcomes"].get("completed", 0) > 0, res["outcomes"]


def test_mutations_reach_the_newer_structures(tmp_path):
    """The seeds qemu made hold each structure the newer parsers read, and
    the structure walk (fuzz_structures.py) finds it: the feature-name
    table, backing file and format names, the bitmap directory and tables,
    the external data file name, the LUKS header and key slots, snapshot
    entries with their extra data and L1 tables."""
    import random

    from tests.hardening.fuzz_structures import structures
    require_qemu()
    seeds = {os.path.basename(p): open(p, "rb").read() for p in fuzzer.make_seeds(str(tmp_path))}
    found = {name: structures(data) for name, data in seeds.items()}
    names = {name: {seeds[name][o:o + n].rstrip(b"\0") for o, n in found[name][1]}
             for name in seeds}
    assert {b"dirty bit", b"lazy refcounts"} <= names["v3.qcow2"]
    assert {b"base.qcow2", b"qcow2", b"b0", b"b1"} <= names["bitmaps.qcow2"]
    assert len(found["bitmaps.qcow2"][0]["bitmaps"]) >= 2 * 7 + 2     # two entries, tables
    assert b"datafile.data" in names["datafile.qcow2"]
    assert len(found["luks.qcow2"][0]["luks"]) == 7 + 8 * 4
    assert {b"first", b"second-with-a-longer-name"} <= names["vmstate.qcow2"]
    assert len(found["vmstate.qcow2"][0]["snapshot"]) >= 2 * (9 + 3)
    # and a mutation changes them: some of 200 mutate a name or such a field
    rng = random.Random(1)
    data = seeds["bitmaps.qcow2"]
    spots = {o for fields in found["bitmaps.qcow2"][0].values() for o, _ in fields}
    spots |= {o + i for o, n in found["bitmaps.qcow2"][1] for i in range(n)}
    hit = 0
    for _ in range(200):
        out = fuzzer.mutate_image(data, rng, 1)
        hit += any(out[o:o + 8] != data[o:o + 8] for o in spots if o + 8 <= len(out))
    assert hit >= 40, hit
