"""The quick seeded set of the fuzzer (tests/hardening/fuzzer.py; long
runs: scripts/fuzz.py): mutated qemu-made images through open, read,
block_status, check, check -r all and convert, and mutated client streams
through the NBD server, each input in a bounded child (1 GiB address
space, a timeout).  Any crash, hang, unbounded allocation, error that is
not a Qcow2Error/OSError, or write to an image opened read-only fails."""

import pytest

from tests.hardening import fuzzer
from tests.helpers.qemu_util import require_qemu

pytestmark = pytest.mark.qemu

EXECUTIONS = 25


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    require_qemu()
    return fuzzer.make_seeds(str(tmp_path_factory.mktemp("seeds")))


@pytest.mark.parametrize("target", fuzzer.TARGETS)
def test_seeded_fuzz(target, seeds, tmp_path):
    fz = fuzzer.Fuzzer(target, seeds, str(tmp_path), seed=2026)
    findings = fz.run(executions=EXECUTIONS)
    assert fz.executions == EXECUTIONS
    assert not findings, "\n\n".join(f"{r['outcome']}: {r.get('error', '')[-1500:]}"
                                     for _, r in findings[:3])
    if target != "nbd":     # the inputs reach past the header checks, not only into them
        assert fz.refused.get("completed", 0) > 0, fz.refused
