"""-r (convert, commit): writes paced to a rate (ops/ratelimit.py), checked
on a simulated clock and through the two operations' write paths."""

import pytest

import qcow2fast
from qcow2fast.ops import ratelimit

MiB = 1 << 20


class Clock:
    def __init__(self):
        self.now, self.slept = 100.0, []

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.slept.append(s)
        self.now += s


def test_writes_wait_while_ahead_of_the_rate(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(ratelimit.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(ratelimit.time, "sleep", clock.sleep)
    pace = ratelimit.WriteRate(4 * MiB)
    pace.admit(2 * MiB)                 # the first write goes at once
    assert clock.slept == []
    pace.admit(2 * MiB)                 # 2 MiB written: half a second's worth
    assert clock.slept == [pytest.approx(0.5)]
    clock.now += 2.0                    # slow writes: nothing to wait for
    pace.admit(2 * MiB)
    assert len(clock.slept) == 1
    pace.admit(2 * MiB)                 # 6 MiB in 2.5 s: 1.5 s of rate owed, none ahead
    assert len(clock.slept) == 1
    pace.admit(8 * MiB)                 # 8 MiB written by t=2.5 s: 2 s of rate, not ahead
    pace.admit(MiB)                     # 16 MiB written: 4 s of rate at t=2.5: wait 1.5
    assert clock.slept[-1] == pytest.approx(1.5)
    assert ratelimit.paced(0) is None and ratelimit.paced(None) is None
    with pytest.raises(ValueError):
        ratelimit.WriteRate(-1)


@pytest.fixture
def admitted(monkeypatch):
    seen = []
    monkeypatch.setattr(ratelimit.WriteRate, "admit", lambda self, n: seen.append(n))
    return seen


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_convert_paces_the_bytes_it_writes(tmp_path, admitted, fmt):
    src = tmp_path / "src.qcow2"
    qcow2fast.create(src, 64 * MiB)
    with qcow2fast.open(src, "r+") as img:
        img.write(0, b"\x11" * (3 * MiB))
        img.write(40 * MiB, b"\x22" * MiB)
    qcow2fast.convert(src, tmp_path / f"out.{fmt}", format=fmt, rate_limit=MiB)
    assert sum(admitted) == 4 * MiB          # the data; the holes are not written
    admitted.clear()
    qcow2fast.convert(src, tmp_path / "again.qcow2")
    assert admitted == []


def test_commit_paces_the_bytes_it_commits(tmp_path, admitted):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qcow2fast.create(base, 32 * MiB)
    qcow2fast.create(top, backing_file=str(base), backing_format="qcow2")
    with qcow2fast.open(top, "r+") as img:
        img.write(MiB, b"\x33" * (5 * MiB))
    qcow2fast.commit(top, rate_limit=MiB)
    assert sum(admitted) == 5 * MiB
    with qcow2fast.open(base) as img:
        assert img.read(MiB, 5 * MiB) == b"\x33" * (5 * MiB)
