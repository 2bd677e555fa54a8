"""convert's and rebase's model-free pieces: the zero-detection kernel
behind -S, rebase's unit comparison, and the writer's writes of its
buffers."""

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


@given(st.lists(st.integers(0, 700 << 10), max_size=12), st.integers(0, 1 << 20))
@settings(max_examples=40, deadline=None)
def test_pwrite_buffers_writes_every_byte_in_order(tmp_path_factory, lengths, off):
    """The writer's one call per batch (fileio.pwrite_buffers: the GIL
    released once, calls of at most WRITE_MAX bytes): every byte of the
    buffers lands back to back from ``off``, and the end is returned."""
    import os
    import numpy as np
    from qcow2fast._ext.fileio import pwrite_buffers
    bufs = [bytes([i % 251]) * n if i % 2 else np.full(n, i % 251, np.uint8)
            for i, n in enumerate(lengths)]
    path = tmp_path_factory.mktemp("pw") / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert pwrite_buffers(fd, bufs, off) == (0, off + sum(lengths))
        assert os.pread(fd, sum(lengths), off) == b"".join(bytes(b) for b in bufs)
    finally:
        os.close(fd)


def test_pwrite_buffers_reports_errno_and_offset(tmp_path):
    """A failed write: (errno, where), nothing raised; pwrite_all names them."""
    import errno
    import os
    from qcow2fast._ext.fileio import pwrite_buffers
    from qcow2fast.host.file import pwrite_all
    r, w = os.pipe()
    try:
        assert pwrite_buffers(w, [b"x" * 10], 4096) == (errno.ESPIPE, 4096)
    finally:
        os.close(r)
        os.close(w)
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pwrite_buffers(fd, [b"", b"ab"], 7) == (errno.EBADF, 7)
        with pytest.raises(OSError, match="write at offset 0x7") as e:
            pwrite_all(fd, b"ab", 7, "f")
        assert e.value.errno == errno.EBADF and e.value.filename == "f"
    finally:
        os.close(fd)


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
