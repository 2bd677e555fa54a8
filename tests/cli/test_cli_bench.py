"""qcow2fast bench against qemu-img bench 7.2: the same requests (the images
they write compare identical), the same summary lines and exit statuses."""

import re
import shutil
import time

import numpy as np

import pytest

import qcow2fast
from qcow2fast.ops import bench
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import MiB, qemu_check, qemu_create, qemu_img

pytestmark = pytest.mark.qemu


@pytest.fixture
def pair(tmp_path):
    a = qemu_create(tmp_path / "a.qcow2", 16 * MiB)
    b = str(tmp_path / "b.qcow2")
    shutil.copy(a, b)
    return a, b


@pytest.mark.parametrize("args", [
    ["-c", "3000", "-d", "4", "-s", "4k", "-S", "8k", "-o", "4096", "-w", "--pattern=7",
     "--flush-interval=100"],
    ["-c", "2000", "-d", "1", "-s", "3", "-S", "70001", "-w", "--pattern=9"],
    ["-c", "500", "-s", "64k", "-S", "1M", "-w", "--pattern=200", "-t", "writethrough"],
    ["-c", "300", "-d", "2", "-w", "--flush-interval=8", "--no-drain", "-t", "none"],
])
def test_writes_and_summary_equal_qemu(capsys, pair, args):
    a, b = pair
    q = qemu_img("bench", *args, a)
    status, out, err = run_cli(capsys, "bench", *args, b)
    assert status == 0, err
    ours = out.splitlines()
    theirs = q.stdout_text.splitlines()
    assert ours[:len(theirs) - 1] == theirs[:-1]           # "Sending ..." lines
    assert re.fullmatch(r"Run completed in \d+\.\d{3} seconds\.", ours[len(theirs) - 1])
    assert re.match(r"[\d,]+ IOPS, [\d,.]+ MiB/s; latency p50 ", ours[-1])
    qemu_check(b)
    assert qemu_img("compare", a, b, check=False).returncode == 0


def test_reads_and_quiet(capsys, pair):
    _, b = pair
    status, out, _ = run_cli(capsys, "bench", "-q", "-c", "1000", "-d", "8", b)
    assert status == 0
    assert out.splitlines()[0] == ("Sending 1000 read requests, 4096 bytes each, 8 in parallel "
                                   "(starting at offset 0, step size 4096)")
    assert len(out.splitlines()) == 2


@pytest.mark.parametrize("args", [["-t", "bogus"], ["-w", "--pattern=300"],
                                  ["--flush-interval=10"], ["-d", "4", "-w", "--flush-interval=2"],
                                  ["-o", "100M"], ["-s", "4k", "-o", "16382k"]])
def test_errors_equal_qemu(capsys, pair, args):
    a, b = pair
    q = qemu_img("bench", "-c", "10", *args, a, check=False)
    status, _, err = run_cli(capsys, "bench", "-c", "10", *args, b)
    assert status == q.returncode == 1
    assert err.startswith("qcow2fast: ")


def test_random_mix_writes_where_it_says(capsys, pair):
    _, b = pair
    status, out, _ = run_cli(capsys, "bench", "-c", "4000", "-d", "3", "--random", "--seed",
                             "11", "--rw-mix=40", "--pattern=77", b)
    assert status == 0
    assert "mixed (40% write)" in out and "random offsets, seed 11" in out
    offs = bench.random_offsets(4000, 4096, 16 * MiB, 11)
    writes = bench.write_mask(4000, 40, 11)
    assert 0.3 < writes.mean() < 0.5
    with qcow2fast.open(b) as img:
        for off in set(offs[writes].tolist()):
            assert img.read(off, 4096) == bytes([77]) * 4096
        untouched = set(range(0, 16 * MiB, 4096)) - set(offs[writes].tolist())
        for off in sorted(untouched)[:200]:
            assert img.read(off, 4096) == bytes(4096)
    qemu_check(b)


def test_api_latencies(tmp_path):
    p = str(tmp_path / "x.qcow2")
    qcow2fast.create(p, 4 * MiB)
    with qcow2fast.open(p, "r+") as img:
        offs = bench.sequential_offsets(1000, 0, 4096, img.size)
        r = bench.run(img, offs, np.ones(1000, dtype=bool), 4096, depth=4, pattern=5)
    assert r.count == 1000 and len(r.latencies_ns) == 1000 and (r.latencies_ns > 0).all()
    assert r.iops > 0 and r.percentile_us(50) <= r.percentile_us(100)


def test_first_error_stops_every_worker():
    class Failing:
        """readinto fails at one offset.  Calls after the failure are
        counted, and (for the first 1000) sleep 1 ms, so that the failed
        worker gets the GIL back to record its error whatever the load."""
        def __init__(self):
            self.failed = False
            self.after = 0

        def readinto(self, offset, buf):
            if offset == 100 * 4096:
                self.failed = True
                raise OSError(5, "injected read error")
            if self.failed:
                self.after += 1
                if self.after <= 1000:
                    time.sleep(0.001)

        def write(self, offset, data):
            raise AssertionError("no write was asked for")

    img = Failing()
    offs = bench.sequential_offsets(1_000_000, 0, 4096, 1 << 40)
    with pytest.raises(OSError, match="injected"):
        bench.run(img, offs, np.zeros(len(offs), dtype=bool), 4096, depth=4)
    # The other three workers stop at their next check (every 64 requests).
    assert img.after <= 3 * 64 * 2, img.after
