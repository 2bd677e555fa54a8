"""Long backing chains made by qemu: reads bit-exact against qemu-img
convert at depths 2 to 1000 (mixed cluster sizes, raw base, v2, compressed
and extended-L2 layers), map and NBD allocation depth equal to qemu's,
a 1000-deep chain under a low descriptor limit, the resolved-mapping
cache's invalidation, and bad chains."""

import json
import random
import threading

import numpy as np
import pytest

import qcow2fast
from qcow2fast.engine import backing
from qcow2fast.engine.chain import LAYER_L2_ENTRY
from qcow2fast.errors import CorruptImageError, UnsupportedFeatureError
from tests.helpers.chain_util import MIXED, layer_name, make_deep_chain
from tests.helpers.nbd_util import nbdinfo, require_libnbd, served
from tests.helpers.qemu_util import (KiB, MiB, assert_bytes_equal, file_state, qemu_create,
                                     qemu_img, qemu_io, qemu_raw, run_python)

pytestmark = pytest.mark.qemu


def check_reads(top, expected, seed=1, count=400):
    """Whole-disk, cluster-crossing and random reads equal ``expected``."""
    with qcow2fast.open(top) as img:
        assert img.read(0, img.size) == expected
        got = bytearray(img.size)
        for off in range(0, img.size, 192 * KiB):           # runs of every kind, across blocks
            img.readinto(off, memoryview(got)[off:off + 192 * KiB])
        assert_bytes_equal(bytes(got), expected)
        rng = random.Random(seed)
        for _ in range(count):
            n = rng.randrange(1, 9000)
            off = rng.randrange(0, img.size - n)
            assert img.read(off, n) == expected[off:off + n], (off, n)
        return img.cache_stats


def qemu_map(path):
    return qemu_img("map", "--output=json", path).stdout_text


def qf_map(path):
    p = run_python(f"import sys; from qcow2fast.cli import main; "
                   f"sys.exit(main(['map', '--output=json', {str(path)!r}]))")
    return p.stdout_text


@pytest.mark.parametrize("depth", [2, 64, 256])
def test_chain_reads_and_map_equal_qemu(tmp_path, depth):
    top = make_deep_chain(tmp_path, depth)
    stats = check_reads(top, qemu_raw(top))
    assert stats["chain_layers"] == depth and stats["chain_map_misses"] > 0
    assert qf_map(top) == qemu_map(top)


def test_mixed_chain_reads_and_map_equal_qemu(tmp_path):
    """Cluster sizes 512 B to 2 MiB, extended L2, compressed and v2 layers."""
    top = make_deep_chain(tmp_path, 96, variants=MIXED)
    check_reads(top, qemu_raw(top), count=800)
    assert qf_map(top) == qemu_map(top)
    # A layer of the chain read on its own (no resolved map: the walk).
    mid = str(tmp_path / layer_name(50))
    with qcow2fast.open(top) as img:
        layer = img
        for _ in range(46):
            layer = layer.backing
        assert layer.path == mid
        assert layer.read(0, layer.size) == qemu_raw(mid)


def test_raw_base_shorter_than_the_top(tmp_path):
    """A raw base (smaller than the overlays, and not a whole number of
    units) and layers of other sizes: past a layer's end reads zeros."""
    top = make_deep_chain(tmp_path, 40, size=2 * MiB, variants=MIXED[:4], base_fmt="raw")
    with open(tmp_path / layer_name(0), "r+b") as f:
        f.truncate(MiB + 3 * 512)
    qemu_img("resize", "-q", "--shrink", str(tmp_path / layer_name(20)), str(MiB + 65 * KiB))
    mid = qemu_create(tmp_path / "grow.qcow2", 3 * MiB, backing=top, backing_fmt="qcow2")
    qemu_io(mid, "write -P 0x77 2M 4k")
    check_reads(mid, qemu_raw(mid), count=600)
    assert qf_map(mid) == qemu_map(mid)


@pytest.fixture(scope="module")
def chain1000(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain1000")
    top = make_deep_chain(tmp, 1000, size=1 * MiB)
    return top, qemu_raw(top)


def test_chain_1000_deep(chain1000):
    top, expected = chain1000
    stats = check_reads(top, expected)
    # One block of resolved units covers this disk: resolved once, then hits.
    assert stats["chain_map_misses"] == 1 and stats["chain_map_hits"] > 400
    assert stats["chain_walks"] == 0
    with qcow2fast.open(top) as img:
        exts = img.block_status()
    # The last writer of guest cluster s (= k mod 16) is the top-most layer k.
    assert [(e.offset // (64 * KiB), e.depth) for e in exts] == [
        (s, (1000 - s) % 16) for s in range(16)]


def test_chain_1000_deep_under_a_low_descriptor_limit(chain1000, tmp_path):
    top, expected = chain1000
    want = tmp_path / "expected.raw"
    want.write_bytes(expected)
    code = f"""
import resource, qcow2fast
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
with qcow2fast.open({top!r}) as img:
    assert img.read(0, img.size) == open({str(want)!r}, "rb").read()
    s = img.cache_stats
    assert s["chain_layers"] == 1000 and s["chain_open_layers"] < 64, s
    assert s["chain_suspends"] > 0, s
    layer = img.backing.backing.backing
    assert layer.read(0, layer.size) == layer.read(0, layer.size)
    print(len(img.block_status()))
"""
    assert run_python(code, timeout=300).stdout_text.split() == ["16"]
    # Too few descriptors to open two layers: a clear error, no crash.
    p = run_python(f"""
import resource, qcow2fast
resource.setrlimit(resource.RLIMIT_NOFILE, (8, 8))
try:
    qcow2fast.open({top!r})
except (qcow2fast.Qcow2Error, OSError) as e:
    print(type(e).__name__, e)
""", timeout=120)
    assert "LimitExceededError" in p.stdout_text and "ulimit -n" in p.stdout_text


def test_resumed_layers_take_their_locks_again(tmp_path):
    """Layers suspended for want of descriptors lose their qemu lock bytes
    while closed; once resumed they hold them again, so a writer (qemu-io
    here, or another qcow2fast) is refused on every open layer."""
    top = make_deep_chain(tmp_path, 60, size=MiB)
    code = f"""
import os, resource, qcow2fast
from qcow2fast.host import lock
resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
with qcow2fast.open({top!r}) as img:
    for _ in range(2):
        img.read(0, img.size)
    s = img.cache_stats
    assert s["chain_suspends"] > 0, s
    perm, _ = lock.permissions("qcow2", True)
    layer, unlocked, checked = img.backing, [], 0
    while layer is not None:
        if not layer.file.closed:
            fd = os.open(layer.path, os.O_RDONLY)
            try:
                if lock.conflict(fd, perm, 0) is None:
                    unlocked.append(layer.path)
            finally:
                os.close(fd)
            checked += 1
        layer = getattr(layer, "backing", None)
    print(checked, len(unlocked))
"""
    checked, unlocked = map(int, run_python(code, timeout=300).stdout_text.split())
    assert checked >= 10 and unlocked == 0, (checked, unlocked)


def test_chain_depth_limit(tmp_path, monkeypatch):
    top = make_deep_chain(tmp_path, 10, size=MiB)
    with pytest.raises(CorruptImageError, match="deeper than 5 images") as e:
        qcow2fast.open(top, max_chain_depth=5)
    assert e.value.field == "backing_file"
    with qcow2fast.open(top, max_chain_depth=11) as img:
        assert len(img.backing_chain) == 11
    monkeypatch.setattr(backing, "MAX_CHAIN_DEPTH", 4)
    with pytest.raises(CorruptImageError, match="deeper than 4"):
        qcow2fast.open(top)
    with qcow2fast.open(top, max_chain_depth=11) as img:
        assert img.read(0, 4096) == qemu_raw(top)[:4096]


def test_bad_chains_name_the_layer(tmp_path):
    a = qemu_create(tmp_path / "a.qcow2", MiB)
    b = qemu_create(tmp_path / "b.qcow2", MiB, backing=a, backing_fmt="qcow2")
    c = qemu_create(tmp_path / "c.qcow2", MiB, backing=b, backing_fmt="qcow2")
    before = {p: file_state(p) for p in (a, b)}
    qemu_img("rebase", "-u", "-b", "c.qcow2", "-F", "qcow2", a)      # a -> c: a loop
    with pytest.raises(CorruptImageError, match="loops") as e:
        qcow2fast.open(c, "r+")
    assert e.value.field == "backing_file" and "c.qcow2" in str(e.value)
    qemu_img("rebase", "-u", "-b", "gone.qcow2", "-F", "qcow2", a)    # a missing layer
    with pytest.raises(FileNotFoundError, match="gone.qcow2.*layer 3"):
        qcow2fast.open(c)
    qemu_img("rebase", "-u", "-b", "x.vmdk", "-F", "vmdk", a)         # another format
    (tmp_path / "x.vmdk").write_bytes(b"KDMV" + bytes(508))
    with pytest.raises(UnsupportedFeatureError, match="vmdk.*backing_format"):
        qcow2fast.open(c)
    (tmp_path / "fake.qcow2").write_bytes(b"\0" * 4096)              # not qcow2 at all
    qemu_img("rebase", "-u", "-b", "fake.qcow2", "-F", "qcow2", a)
    with pytest.raises(CorruptImageError, match=r"fake.qcow2.*layer 3.*magic"):
        qcow2fast.open(c, "r+")
    # Nothing was written to a lower layer (b is untouched; a only by qemu-img rebase).
    assert file_state(b) == before[b]


def test_lower_layers_are_never_written(tmp_path):
    top = make_deep_chain(tmp_path, 20, size=MiB)
    lower = [str(tmp_path / layer_name(k)) for k in range(20)]
    before = [file_state(p) for p in lower]
    expected = bytearray(qemu_raw(top))
    with qcow2fast.open(top, "r+") as img:
        for off in (5, 70 * KiB, 500 * KiB + 3):
            img.write(off, b"\x99" * 5000)
            expected[off:off + 5000] = b"\x99" * 5000
        img.write_zeroes(600 * KiB, 64 * KiB)
        expected[600 * KiB:664 * KiB] = bytes(64 * KiB)
        img.flush()
        assert img.read(0, img.size) == bytes(expected)
    assert [file_state(p) for p in lower] == before
    qemu_img("check", top)
    assert_bytes_equal(qemu_raw(top), bytes(expected))


def test_invalidation_after_a_lower_layer_changes(tmp_path):
    top = make_deep_chain(tmp_path, 12, size=MiB)     # layer k holds guest cluster k
    mid = str(tmp_path / layer_name(2))                # layers[9] of the top's chain
    at = 13 * 64 * KiB                                 # held by the base only
    # force_share: qemu-io writes a layer the open chain reads, so the chain
    # must not hold qemu's "no other writer" lock bytes on it.
    with qcow2fast.open(top, force_share=True) as img:
        before = img.read(0, img.size)
        rmap = img.chain.core.rmap
        assert rmap.entry(at)[:2] == ("data", 11)
        qemu_io(mid, f"write -P 0x42 {at} 64k")        # a lower layer changes (as commit does)
        assert img.read(at, 4096) == before[at:at + 4096]     # the stale mapping
        img.chain.invalidate(at, 64 * KiB, changed=[9])
        assert rmap.entry(at) is None
        after = img.read(0, img.size)
        assert rmap.entry(at)[:2] == ("data", 9)
    assert after[at:at + 64 * KiB] == b"\x42" * (64 * KiB) != before[at:at + 64 * KiB]
    assert after == qemu_raw(top)


def test_batched_reads_after_a_lower_layer_is_reopened(tmp_path):
    """The batch engine reads a layer through the descriptor the chain
    noted for it: after invalidate() reopened that layer (and closed the
    old descriptor, whose number another file then takes), batched reads
    must go to the new one."""
    top = make_deep_chain(tmp_path, 12, size=MiB)
    mid = str(tmp_path / layer_name(2))                # layers[9] of the top's chain
    other = tmp_path / "other.bin"
    other.write_bytes(b"\xee" * MiB)
    with qcow2fast.open(top, force_share=True) as img:
        qemu_io(mid, f"write -P 0x42 {13 * 64 * KiB} 64k")
        img.chain.invalidate(changed=[9])
        with open(other, "rb") as squatter:            # (likely the old descriptor's number)
            want = qemu_raw(top)
            for _ in range(2):                         # resolved, then served in C
                bufs = [bytearray(64 * KiB) for _ in range(16)]
                img.submit([("read", i * 64 * KiB, b) for i, b in enumerate(bufs)])
                assert b"".join(bufs) == want
            assert squatter.read(1) == b"\xee"


def test_concurrent_reads_through_the_chain(tmp_path):
    top = make_deep_chain(tmp_path, 64, size=2 * MiB, variants=MIXED[:4])
    expected = qemu_raw(top)
    errors = []
    with qcow2fast.open(top, l2_cache_size=16 * KiB) as img:       # small: misses and evictions
        def reader(seed):
            rng = np.random.default_rng(seed)
            try:
                for off in rng.integers(0, img.size - 4096, 1500).tolist():
                    if img.read(off, 4096) != expected[off:off + 4096]:
                        errors.append(off)
            except Exception as e:          # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert img.cache_stats["chain_map_bytes"] <= 16 * KiB
    assert errors == []


def test_one_cache_budget_for_the_chain(tmp_path):
    top = make_deep_chain(tmp_path, 200, size=4 * MiB)
    with qcow2fast.open(top, l2_cache_size=384 * KiB) as img:
        s = img.cache_stats
        l2 = s["l2_slots"] * img.l2_cache.slot_bytes
        assert l2 + s["chain_map_bytes"] <= 384 * KiB and s["chain_map_bytes"] >= 192 * KiB
        # Each lower layer keeps two small slices, whatever the depth.
        assert s["chain_layer_l2_bytes"] == 200 * 2 * LAYER_L2_ENTRY


def test_nbd_allocation_depth_deep(tmp_path):
    require_libnbd()
    top = make_deep_chain(tmp_path, 70, size=MiB)
    m = json.loads(qemu_map(top))
    want = [(e["start"], e["length"], e["depth"] + 1 if e["present"] else 0) for e in m]
    with served(top, tmp_path, read_only=True) as (server, uri):
        d = json.loads(nbdinfo("--json", "--map=qemu:allocation-depth", uri).stdout_text)
    got = [(e["offset"], e["length"], e["type"]) for e in d]
    assert got == want and max(t for _, _, t in got) == 16     # 1 + depth, as qemu
