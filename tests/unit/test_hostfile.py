"""hostfile.Prefault: page-cache pages made ahead of buffered writes, once
the writer's writes show that fresh pages are dear."""

import ctypes
import mmap
import os

import numpy as np

from qcow2fast.host import file as hostfile

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p


def resident(path, nbytes):
    """Per page of the first ``nbytes`` of ``path``: held in the page cache (mincore)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, ctypes.c_size_t(nbytes), mmap.PROT_READ, mmap.MAP_SHARED, fd,
                          ctypes.c_long(0))
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = (ctypes.c_ubyte * (nbytes // PAGE))()
            assert _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), vec) == 0
            return np.frombuffer(vec, np.uint8) & 1
        finally:
            _libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes))
    finally:
        os.close(fd)


def dear(p):
    """Report a window of writes at 1 GB per CPU-second: the helper starts."""
    p.wrote(p.WINDOW, p.WINDOW / 1e9)
    assert p.active


def test_prefault_starts_only_where_fresh_pages_are_dear(tmp_path):
    path = tmp_path / "f"
    size = 8 << 20
    with open(path, "wb") as f:
        f.truncate(size)
    fd = os.open(path, os.O_RDWR)
    try:
        p = hostfile.prefault_for(fd)
        assert not p.active
        p.wrote(p.WINDOW // 2, p.WINDOW / 2 / 1e9)      # half a window: no decision yet
        assert not p.active
        p.wrote(p.WINDOW // 2, p.WINDOW / 2 / 5e9)      # the window at 1.7 GB/s: cheap
        assert not p.active
        p.ahead(0, size)                               # idle: asks for nothing
        p.close()
        assert not resident(path, size).any()
        p = hostfile.prefault_for(fd)
        for _ in range(3):                             # 0.5 GB/s
            p.wrote(p.WINDOW // 2, p.WINDOW / 2 / 0.5e9)
        assert p.active
        p.wrote(p.WINDOW, p.WINDOW / 9e9)              # stays on for the rest of the file
        assert p.active
        p.ahead(0, size)
        p.close()
        assert resident(path, size).all()
    finally:
        os.close(fd)


def test_prefault_makes_pages_of_the_range_only(tmp_path):
    path = tmp_path / "f"
    size = 16 << 20
    with open(path, "wb") as f:
        f.truncate(size)                       # a hole: nothing cached, nothing allocated
    fd = os.open(path, os.O_RDWR)
    try:
        assert not resident(path, size).any()
        p = hostfile.prefault_for(fd)
        dear(p)
        p.ahead(2 << 20, 5 << 20)              # more than one PIECE
        p.close()
    finally:
        os.close(fd)
    pages = resident(path, size)
    lo, hi = (2 << 20) // PAGE, (7 << 20) // PAGE
    assert pages[lo:hi].all()
    assert not pages[:lo].any() and not pages[hi + 512:].any()   # readahead may round up
    st = os.stat(path)
    assert st.st_size == size and st.st_blocks == 0     # still sparse, same size
    with open(path, "rb") as f:
        assert f.read() == bytes(size)


def test_prefault_past_the_end_and_of_a_pipe(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * PAGE)
    fd = os.open(path, os.O_RDWR)
    try:
        p = hostfile.prefault_for(fd)
        dear(p)
        p.ahead(1 << 20, 1 << 20)              # past the end: nothing to do, no error
        p.close()
        assert os.fstat(fd).st_size == PAGE
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        assert hostfile.prefault_for(w) is None
    finally:
        os.close(r)
        os.close(w)
