"""convert's and rebase's model-free pieces: the zero-detection kernel
behind -S, rebase's unit comparison, and the writer's split of its
buffers into bounded write calls."""

import pytest
from hypothesis import given, settings, strategies as st


@pytest.mark.parametrize("unit", [8, 512, 4096, 65536])
def test_zero_detection_kernel(unit):
    """nonzero_units (convert's -S): a unit is data iff any byte is nonzero,
    wherever in the unit that byte is (first, last, middle)."""
    import numpy as np
    from qcow2fast._ext.kernels import nonzero_units
    rng = np.random.default_rng(unit)
    n = 40
    buf = np.zeros(n * unit + 7, np.uint8)         # bytes past the units are ignored
    buf[n * unit:] = 1
    for i, at in zip(rng.choice(n, 15, replace=False), [0, unit - 1] + [None] * 13):
        buf[i * unit + (rng.integers(unit) if at is None else at)] = rng.integers(1, 256)
    out = np.full(n, 7, np.uint8)
    nonzero_units(buf, unit, out)
    assert out.tolist() == buf[:n * unit].reshape(n, unit).any(axis=1).astype(np.uint8).tolist()
    with pytest.raises(ValueError):
        nonzero_units(buf, unit, np.empty(n + 1, np.uint8))


@given(st.lists(st.integers(0, 700 << 10), max_size=12))
@settings(max_examples=60, deadline=None)
def test_write_calls_cover_the_buffers_in_bounded_calls(lengths):
    """The writer's calls carry every byte in order, none over WRITE_MAX
    bytes or IOV_MAX buffers (large writes take 2 MiB folios: see WRITE_MAX)."""
    from qcow2fast.ops.qcow2_writer import IOV_MAX, WRITE_MAX, write_calls
    bufs = [bytes([i % 251]) * n for i, n in enumerate(lengths)]
    calls = list(write_calls(bufs))
    assert all(0 < n <= WRITE_MAX and len(iov) <= IOV_MAX and sum(map(len, iov)) == n
               for iov, n in calls)
    assert b"".join(bytes(b) for iov, _ in calls for b in iov) == b"".join(bufs)


@pytest.mark.parametrize("unit", [512, 4096, 65536])
def test_differing_units_finds_every_difference(unit):
    """differing_units (rebase's comparison): a unit differs iff any byte
    does, wherever in the unit (first, last, middle); equal units read
    whole."""
    import numpy as np
    from qcow2fast._ext.kernels import differing_units
    rng = np.random.default_rng(unit)
    n = 40
    a = rng.integers(0, 256, n * unit + 5, np.uint8)
    b = a.copy()
    b[n * unit:] ^= 1                               # bytes past the units are ignored
    for i, at in zip(rng.choice(n, 15, replace=False), [0, unit - 1] + [None] * 13):
        b[i * unit + (rng.integers(unit) if at is None else at)] ^= rng.integers(1, 256)
    out = np.full(n, 7, np.uint8)
    differing_units(a, b, unit, out)
    want = (a[:n * unit] != b[:n * unit]).reshape(n, unit).any(axis=1)
    assert out.tolist() == want.astype(np.uint8).tolist()
    with pytest.raises(ValueError):
        differing_units(a, b[:unit], unit, out)
