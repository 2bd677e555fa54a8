"""An encrypted image shared between threads: readers and in-place
overwriters run in parallel (each batch takes its own libcrypto context
from the cipher's pool), and everything reads back as written."""

import threading

import numpy as np

import qcow2fast

MiB = 1 << 20
PW = b"threads"


def test_parallel_reads_and_overwrites(tmp_path):
    path = tmp_path / "t.qcow2"
    qcow2fast.create(path, 8 * MiB, encrypt={"format": "luks", "key_secret": PW,
                                             "iter_time": 10})
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes()
    errors = []
    with qcow2fast.open(path, "r+", key_secret=PW) as img:
        img.write(0, data)                      # allocated: the threads overwrite in place
        expect = bytearray(data)

        def worker(k):
            try:
                lo = k * 2 * MiB
                for i in range(200):
                    off = lo + (i * 4096 * 7) % (2 * MiB - 4096)
                    buf = bytes([k + 1]) * 4096
                    img.write(off, buf)
                    assert img.read(off, 4096) == buf
            except BaseException as e:          # reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for k in range(4):
            lo = k * 2 * MiB
            for i in range(200):
                off = lo + (i * 4096 * 7) % (2 * MiB - 4096)
                expect[off:off + 4096] = bytes([k + 1]) * 4096
        assert img.read(0, img.size) == expect
    with qcow2fast.open(path, key_secret=PW) as img:
        assert img.read(0, img.size) == expect
