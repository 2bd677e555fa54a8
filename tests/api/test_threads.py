"""Several threads sharing one Image: allocating writes, overwrites, zeroes,
discards and reads at once, each thread in its own region -- reads one by
one or batched (``submit``: the C path, the GIL released, reads below the
image from its backing file's layers in the same batch).  Every read sees
what its thread wrote; afterwards every region holds it, and qemu-img
agrees."""

import os
import random
import threading

import pytest

import qcow2fast
from qcow2fast._ext import batch

from tests.helpers.qemu_util import qemu_check, qemu_create, qemu_io, qemu_raw

pytestmark = pytest.mark.qemu

NTHREADS = 4
REGION = 3 << 20


@pytest.mark.parametrize("cache_mode", ["writeback", "writethrough"])
@pytest.mark.parametrize("cluster_size", [4096, 65536])
@pytest.mark.parametrize("reads", ["one by one", "batched over a backing file"])
def test_concurrent_mixed_io(tmp_path, cache_mode, cluster_size, reads):
    path = str(tmp_path / "t.qcow2")
    size = NTHREADS * REGION
    batched = reads != "one by one"
    if batched:
        backing = str(tmp_path / "base.qcow2")
        qemu_create(backing, size, cluster_size=65536)
        qemu_io(backing, f"write -P 0x5b 0 {size}")
        qemu_create(path, size, backing=backing, cluster_size=cluster_size)
        models = [bytearray(b"\x5b" * REGION) for _ in range(NTHREADS)]
    else:
        qcow2fast.create(path, size, cluster_size=cluster_size)
        models = [bytearray(REGION) for _ in range(NTHREADS)]
    errors = []
    submitted = [0]
    one_requests = batch.one_requests()

    with qcow2fast.open(path, "r+", cache_mode=cache_mode, l2_cache_size=4 * cluster_size,
                        l2_cache_entry_size=min(cluster_size, 4096)) as img:
        def work(k):
            rng = random.Random(k)
            base, model = k * REGION, models[k]
            try:
                for _ in range(400 if batched else 150):
                    off = rng.randrange(REGION)
                    n = min(rng.randrange(1, 40000), REGION - off)
                    op = rng.random()
                    if op < 0.55:
                        data = rng.randbytes(n)
                        img.write(base + off, data)
                        model[off:off + n] = data
                    elif op < 0.7:
                        img.write_zeroes(base + off, n, may_unmap=rng.random() < 0.5)
                        model[off:off + n] = bytes(n)
                    else:
                        if batched:         # the read cut in pieces, one batch
                            cut = sorted({0, n, *(rng.randrange(n) for _ in range(3))})
                            bufs = [bytearray(b - a) for a, b in zip(cut, cut[1:])]
                            img.submit([("read", base + off + a, buf)
                                        for a, buf in zip(cut, bufs)])
                            submitted[0] += len(bufs)
                            got = b"".join(bufs)
                        else:
                            got = img.read(base + off, n)
                        if got != bytes(model[off:off + n]):
                            errors.append(f"thread {k}: read mismatch at {base + off:#x}+{n}")
            except Exception as e:      # reported below, in the main thread
                errors.append(f"thread {k}: {e!r}")

        threads = [threading.Thread(target=work, args=(k,)) for k in range(NTHREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:5]
        if batched:     # (not all through the one-request path: C read some)
            assert batch.one_requests() - one_requests < submitted[0]
        assert img.read(0, size) == b"".join(models)
    qemu_check(path)
    assert qemu_raw(path) == b"".join(models)


def test_reads_whether_page_cached_or_not(tmp_path):
    """Reads from disk and from the page cache give qemu's bytes, from several threads."""
    path = qemu_create(tmp_path / "c.qcow2", 8 << 20)
    qemu_io(path, "write -P 0x5c 0 3M", "write -P 0x7e 5M 2M")
    expected = qemu_raw(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)     # not cached first
        with qcow2fast.open(path) as img:
            got = [None] * 4
            threads = [threading.Thread(target=lambda k=k: got.__setitem__(
                k, img.read(k * (2 << 20), 2 << 20))) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert b"".join(got) == expected
            assert img.read(0, len(expected)) == expected       # now cached
    finally:
        os.close(fd)
