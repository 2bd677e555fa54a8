"""The batched request path (_ext/batch.pyx): ``Image.submit``,
``readv_into`` and the asyncio interface give what the same requests give
one after the other, on images qemu made (data, zero, compressed and
unallocated clusters, subclusters, a backing file), with io_uring and with
the pread/pwrite loop; qemu-img check finds the result clean and compare
finds it equal to the model.  Errors are per request, and a read-only image
refuses writes without changing a byte."""

import asyncio
import random
import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcow2fast
from qcow2fast._ext import batch
from qcow2fast.errors import InvalidArgumentError, ReadOnlyImageError

from tests.helpers.qemu_util import qemu_check, qemu_compare, qemu_create, qemu_io, qemu_raw

pytestmark = pytest.mark.qemu

SIZE = 1 << 20
ENGINES = ["io_uring", "pread"]
LAYOUTS = {
    "plain": {"cluster_size": 4096},
    "subclusters": {"cluster_size": 65536, "extended_l2": "on"},
    "backing": {"cluster_size": 4096},
}


@pytest.fixture(params=ENGINES)
def engine(request):
    old = batch.set_io_engine(request.param)
    yield request.param
    batch.set_io_engine(old)


def make_image(path, layout):
    """A qemu-made image with every kind of cluster; returns its content."""
    opts = dict(LAYOUTS[layout])
    backing = None
    if layout == "backing":
        backing = str(path) + ".base"
        qemu_create(backing, SIZE, cluster_size=65536)
        qemu_io(backing, f"write -P 0x33 0 {SIZE}")
    qemu_create(path, SIZE, backing=backing, **opts)
    qemu_io(path, "write -P 0x11 0 256k", "write -z 256k 64k",
            "write -c -P 0x22 512k 64k", "write -P 0x44 700k 20k")
    return bytearray(qemu_raw(path))


requests = st.lists(
    st.tuples(st.sampled_from(["read", "write"]),
              st.integers(0, SIZE - 1),
              st.integers(1, 70000),
              st.integers(0, 255),
              st.sampled_from(["own", "arena"])),
    min_size=1, max_size=24)


def run_model(model, arena, reqs):
    """The requests one after the other on a bytearray (the batch's
    meaning); returns what each read returns."""
    reads = []
    for op, off, n, fill, buf in reqs:
        view = arena[buf[1]:buf[1] + n] if buf[0] == "arena" else None
        if op == "read":
            data = model[off:off + n]
            reads.append(bytes(data))
            if view is not None:
                arena[buf[1]:buf[1] + n] = data
        else:
            reads.append(None)
            model[off:off + n] = bytes(view) if view is not None else bytes([fill]) * n
    return reads


@pytest.mark.parametrize("layout", LAYOUTS)
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=requests, arena_off=st.lists(st.integers(0, 100000), min_size=24, max_size=24))
def test_batch_is_the_sequential_path(tmp_path_factory, engine, layout, reqs, arena_off):
    path = str(tmp_path_factory.mktemp("batch") / "t.qcow2")
    model = make_image(path, layout)
    arena = bytearray(200000)               # buffers of different requests may overlap here
    mv = memoryview(arena)
    expect_arena = bytearray(arena)
    batch_reqs, model_reqs, own = [], [], []
    for i, (op, off, n, fill, where) in enumerate(reqs):
        n = min(n, SIZE - off)
        if where == "arena":
            a = arena_off[i]
            buf, desc = mv[a:a + n], ("arena", a)
        else:
            buf, desc = (bytearray(n) if op == "read" else bytes([fill]) * n), ("own",)
        batch_reqs.append((op, off, buf))
        model_reqs.append((op, off, n, fill, desc))
        own.append(buf)
    reads = run_model(model, expect_arena, model_reqs)
    with qcow2fast.open(path, "r+") as img:
        results = img.submit(batch_reqs)
        assert results == [memoryview(b).nbytes for _, _, b in batch_reqs]
        # Every read saw what the sequential path shows at its turn.
        for (op, _, _, _, desc), buf, want in zip(model_reqs, own, reads):
            if op == "read" and desc[0] == "own":
                assert bytes(buf) == want
        assert bytes(arena) == bytes(expect_arena)
        assert img.read(0, SIZE) == bytes(model)
    qemu_check(path)
    qemu_compare(path, bytes(model))


def sequential_reads(initial, reqs):
    """What each read of ``reqs`` (op, off, n, data) returns, one after the other."""
    data = bytearray(initial)
    out = []
    for op, off, n, payload in reqs:
        if op == "read":
            out.append(bytes(data[off:off + n]))
        else:
            data[off:off + n] = payload
    return out, data


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reads_see_earlier_writes(tmp_path, engine, layout):
    path = str(tmp_path / "t.qcow2")
    initial = make_image(path, layout)
    reqs = []
    for k in range(40):         # overwrites, allocations, compressed, zero: each read back
        off = (k * 27611) % (SIZE - 9000)
        n = 1 + (k * 4099) % 9000
        reqs.append(("read", off, n, None))
        reqs.append(("write", off + k % 7, n, bytes([k]) * n))
        reqs.append(("read", off, n + 7, None))
    expected, final = sequential_reads(initial, reqs)
    with qcow2fast.open(path, "r+") as img:
        bufs = [bytearray(n) if op == "read" else payload for op, off, n, payload in reqs]
        results = img.submit([(op, off, b) for (op, off, _, _), b in zip(reqs, bufs)])
        assert all(not isinstance(r, BaseException) for r in results), results
        got = [bytes(b) for (op, *_), b in zip(reqs, bufs) if op == "read"]
        assert got == expected
    qemu_check(path)
    qemu_compare(path, bytes(final))


def test_errors_are_per_request(tmp_path, engine):
    path = str(tmp_path / "t.qcow2")
    initial = make_image(path, "plain")
    with qcow2fast.open(path, "r+") as img:
        a, c = bytearray(4096), bytearray(4096)
        results = img.submit([("read", 0, a), ("write", SIZE - 10, b"x" * 20),
                              ("write", 4096, b"y" * 4096), ("read", 4096, c),
                              ("read", SIZE, bytearray(1)), (batch.WRITE, 0, b"z")])
        assert isinstance(results[1], InvalidArgumentError)
        assert isinstance(results[4], InvalidArgumentError)
        assert results[0] == 4096 and results[2] == 4096 and results[3] == 4096
        assert results[5] == 1
        assert bytes(a) == bytes(initial[:4096]) and bytes(c) == b"y" * 4096
        with pytest.raises(ValueError):
            img.submit([("erase", 0, b"")])
        with pytest.raises(InvalidArgumentError):
            img.readv_into([0, SIZE], [bytearray(1), bytearray(1)])
    initial[0:1] = b"z"
    initial[4096:8192] = b"y" * 4096
    qemu_compare(path, bytes(initial))


def test_read_only_refuses_writes(tmp_path, engine):
    path = str(tmp_path / "t.qcow2")
    make_image(path, "plain")
    before = hashlib.sha256(open(path, "rb").read()).digest()
    with qcow2fast.open(path, "r") as img:
        buf = bytearray(4096)
        results = img.submit([("write", 0, b"a" * 4096), ("read", 0, buf),
                              ("write", 8192, b"b")])
        assert isinstance(results[0], ReadOnlyImageError)
        assert isinstance(results[2], ReadOnlyImageError)
        assert results[1] == 4096 and bytes(buf) == b"\x11" * 4096
    assert hashlib.sha256(open(path, "rb").read()).digest() == before


def test_readv_into_and_engines(tmp_path):
    path = str(tmp_path / "t.qcow2")
    initial = make_image(path, "backing")
    offsets = [i * 37000 for i in range(25)]
    old = batch.set_io_engine("pread")
    try:
        assert batch.io_engine() == "pread"
        with qcow2fast.open(path, "r") as img:
            for name in ENGINES:
                batch.set_io_engine(name)
                bufs = [bytearray(5000) for _ in offsets]
                assert img.readv_into(offsets, bufs) == 5000 * len(offsets)
                assert [bytes(b) for b in bufs] == [bytes(initial[o:o + 5000]) for o in offsets]
        with pytest.raises(ValueError):
            batch.set_io_engine("aio")
    finally:
        batch.set_io_engine(old)


def test_asyncio_interface(tmp_path, engine):
    path = str(tmp_path / "t.qcow2")
    initial = make_image(path, "plain")

    async def main(img):
        writes = [img.write_async(i * 5000, bytes([i]) * 5000) for i in range(100)]
        assert await asyncio.gather(*writes) == [5000] * 100
        got = await asyncio.gather(*[img.read_async(i * 5000, 5000) for i in range(100)])
        assert got == [bytes([i]) * 5000 for i in range(100)]
        buf = bytearray(10)
        assert await img.readinto_async(SIZE - 10, buf) == 10
        assert bytes(buf) == bytes(initial[SIZE - 10:])
        with pytest.raises(InvalidArgumentError):
            await img.read_async(SIZE, 1)

    with qcow2fast.open(path, "r+") as img:
        asyncio.run(main(img))
    for i in range(100):
        initial[i * 5000:(i + 1) * 5000] = bytes([i]) * 5000
    qemu_check(path)
    qemu_compare(path, bytes(initial))


@pytest.mark.parametrize("name", ["auto", "io_uring", "pread"])
def test_o_direct_batches(tmp_path, name):
    """cache=none: aligned requests go to the kernel together (io_uring
    under "auto"), unaligned ones through the one-request path."""
    import mmap
    path = str(tmp_path / "t.qcow2")
    initial = make_image(path, "plain")
    old = batch.set_io_engine(name)
    try:
        with qcow2fast.open(path, "r+", cache_mode="none") as img:
            bufs = [mmap.mmap(-1, 8192) for _ in range(8)]       # page-aligned
            data = mmap.mmap(-1, 8192)
            data.write(b"d" * 8192)
            reqs = [("read", k * 65536, b) for k, b in enumerate(bufs)]
            reqs += [("write", 4096, data), ("read", 4096, bytearray(100)),
                     ("read", 4096, bufs[0])]
            assert img.submit(reqs) == [8192] * 9 + [100, 8192]
            assert [bytes(b) for b in bufs[1:]] == [bytes(initial[k * 65536:k * 65536 + 8192])
                                                    for k in range(1, 8)]
            assert bytes(bufs[0]) == b"d" * 8192
            assert bytes(reqs[9][2]) == b"d" * 100
    finally:
        batch.set_io_engine(old)
    initial[4096:12288] = b"d" * 8192
    qemu_check(path)
    qemu_compare(path, bytes(initial))


def test_timed_batches_workers_stop_on_the_first_error(tmp_path):
    """Two workers of ``bench -d N`` share a stop flag: the one that meets
    an error (a request past the end) sets it and raises; the other,
    whose loop runs without the GIL, stops at its next batch instead of
    running its million requests to the end."""
    import threading

    import numpy as np

    p = str(tmp_path / "x.qcow2")
    qemu_create(p, SIZE, cluster_size=4096)
    n = 1_000_000
    offs = (np.arange(n, dtype=np.int64) * 4096) % SIZE
    bad = offs.copy()
    bad[100] = SIZE                            # one request past the end
    stop = bytearray(1)
    done, errors = {}, []

    def worker(name, o):
        lat = np.zeros(n, dtype=np.int64)
        try:
            done[name] = batch.timed_batches(img, o, np.zeros(n, dtype=np.uint8),
                                             [bytearray(4096) for _ in range(4)],
                                             bytes(4096), 4, lat, stop)
        except InvalidArgumentError as e:
            errors.append(e)

    with qcow2fast.open(p) as img:
        ts = [threading.Thread(target=worker, args=(name, o))
              for name, o in (("bad", bad), ("good", offs))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert len(errors) == 1 and "outside the image" in str(errors[0])
    assert stop == b"\x01" and "bad" not in done
    assert done["good"] < n and done["good"] % 4 == 0


def test_bench_batches_mark_bitmaps(tmp_path):
    """With a write observer (an enabled bitmap) ``bench -d N`` takes the
    checked path batch by batch: every write marks the bitmap, and the data
    is what the requests wrote (qemu reads it)."""
    from qcow2fast.ops import bench

    p = str(tmp_path / "b.qcow2")
    qemu_create(p, 16 * SIZE, cluster_size=65536)
    offs = bench.random_offsets(3000, 4096, 16 * SIZE, 5)
    writes = bench.write_mask(3000, 50, 5)
    with qcow2fast.open(p, "r+") as img:
        img.add_bitmap("b0")
        bench.run(img, offs, writes, 4096, depth=4, pattern=9)
    with qcow2fast.open(p) as img:
        dirty = [(a, n) for a, n, d in img.dirty_extents("b0") if d]
        for off in set(offs[writes].tolist()):
            assert any(a <= off and off + 4096 <= a + n for a, n in dirty), off
            assert img.read(off, 4096) == bytes([9]) * 4096
        marked = sum(n for a, n in dirty)
        assert marked == 65536 * len({o // 65536 for o in offs[writes].tolist()})
    qemu_check(p)
    qemu_io(p, f"read -P 9 {int(offs[writes][0])} 4096")   # (a mismatch fails)


def test_reads_through_a_chain_are_resolved_in_c(tmp_path, engine):
    """Reads below the top go to the chain's layers in the batch itself once
    the chain's resolved map knows the blocks (chain.pyx's batch_reads):
    data of a qcow2 layer and of a raw base shorter than the top, zero
    clusters, unallocated-everywhere; what they read is what qemu reads.
    The compressed cluster of the middle layer and the unit the base ends
    inside are left to the one-request path."""
    base, mid, top = (str(tmp_path / n) for n in ("base.raw", "mid.qcow2", "top.qcow2"))
    with open(base, "wb") as f:
        f.write(b"\x33" * (SIZE - 3000))                      # ends inside a unit
    qemu_create(mid, SIZE, backing=base, backing_fmt="raw", cluster_size=4096)
    qemu_io(mid, "write -P 0x55 64k 128k", "write -z 300k 40k", "write -c -P 0x66 900k 64k")
    qemu_create(top, SIZE, backing=mid, cluster_size=65536, extended_l2="on")
    qemu_io(top, "write -P 0x11 0 64k", "write -P 0x77 400k 8k", "write -z 600k 2k")
    want = qemu_raw(top)
    rng = random.Random(5)
    reqs = []
    for _ in range(200):                                      # below 896 KiB: C can serve all
        off = rng.randrange(0, 896 << 10)
        reqs.append((off, rng.randrange(1, min(70000, (896 << 10) - off) + 1)))
    with qcow2fast.open(top, "r") as img:
        for rnd in range(2):
            bufs = [bytearray(n) for _, n in reqs]
            before = batch.one_requests()
            assert img.submit([("read", off, b) for (off, _), b in zip(reqs, bufs)]) == \
                [n for _, n in reqs]
            for (off, n), b in zip(reqs, bufs):
                assert bytes(b) == want[off:off + n], (rnd, off, n)
            if rnd == 1:        # every block resolved by the first round
                assert batch.one_requests() == before
        tail = [bytearray(SIZE - (880 << 10))]
        before = batch.one_requests()
        img.submit([("read", 880 << 10, tail[0])])
        assert bytes(tail[0]) == want[880 << 10:]
        assert batch.one_requests() == before + 1            # compressed, walked: Python


def test_reading_threads_get_descriptors_of_their_own(tmp_path):
    """Batched reads from several threads go through descriptors of their
    own (csrc/qf_readfd.h: reopened through /proc/self/fd, so one struct
    file is not shared), see what was written through the image's own,
    and are closed with the image."""
    import os
    import threading
    path = str(tmp_path / "t.qcow2")
    initial = make_image(path, "plain")
    fd_dir = "/proc/self/fd"
    before = set(os.listdir(fd_dir))
    with qcow2fast.open(path, "r+") as img:
        img.write(4096, b"\x5a" * 4096)                   # through the image's own descriptor
        initial[4096:8192] = b"\x5a" * 4096
        seen, errors = [], []
        together = threading.Barrier(8)     # all alive at once: 8 threads, not one reused

        def reader():
            try:
                together.wait()
                bufs = [bytearray(4096) for _ in range(16)]
                img.submit([("read", i * 4096, b) for i, b in enumerate(bufs)])
                seen.append(b"".join(bufs))
            except BaseException as e:          # reported below
                errors.append(e)

        threads = [threading.Thread(target=reader) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and seen == [bytes(initial[:16 * 4096])] * 8
        image = os.path.realpath(path)
        ours = [f for f in set(os.listdir(fd_dir)) - before
                if os.path.realpath(os.path.join(fd_dir, f)) == image]
        assert len(ours) >= 2           # the image's own, and the readers'
    assert not [f for f in set(os.listdir(fd_dir)) - before
                if os.path.realpath(os.path.join(fd_dir, f)) == image]
