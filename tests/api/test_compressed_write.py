"""Image.write_compressed (qemu's ``write -c``): compressed clusters written
into an open image read back in qemu, pass qemu-img check, show as
compressed in qemu-img map, are packed as qemu packs them, and can be
overwritten by qemu; the refusals; a random mix with the other writes over
the model.  (convert -c through Image: tests/convert/test_convert_compressed.py.)"""

import os

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test

import qcow2fast
from qcow2fast.engine.compress import Compressor
from qcow2fast.errors import InvalidArgumentError, ReadOnlyImageError
from qcow2fast.spec.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD
from tests.api.test_properties import SETTINGS, Qcow2Machine
from tests.helpers.model import ModelImage
from tests.helpers.qemu_util import (Rng, assert_bytes_equal, assert_compressed, assert_plain,
                                     assert_qemu_content, compressed_descriptor, compressible_bytes,
                                     file_state, header, l2_entry_offset, qemu_check, qemu_create,
                                     qemu_img, qemu_io, read_at)

pytestmark = pytest.mark.qemu
KiB, MiB = 1 << 10, 1 << 20


def compressible(rng, n):
    return compressible_bytes(rng, n)


# (compression_type, cluster_size, refcount_bits, extended_l2, compat, backing, lazy)
CONFIGS = [
    ("zlib", 64 * KiB, 16, False, "1.1", False, False),
    ("zstd", 64 * KiB, 16, False, "1.1", False, False),
    ("zlib", 512, 16, False, "1.1", False, False),
    ("zstd", 2 * MiB, 16, False, "1.1", False, False),
    ("zlib", 4 * KiB, 1, False, "1.1", False, False),
    ("zstd", 64 * KiB, 1, False, "1.1", True, False),
    ("zlib", 64 * KiB, 16, True, "1.1", False, False),
    ("zstd", 32 * KiB, 2, True, "1.1", True, True),
    ("zlib", 4 * KiB, 16, False, "0.10", False, False),
    ("zlib", 16 * KiB, 16, False, "0.10", True, False),
    ("zlib", 64 * KiB, 64, False, "1.1", True, True),
]


def config_id(c):
    ctype, cs, rb, ext, compat, backing, lazy = c
    return (f"{ctype}-{cs // KiB if cs >= KiB else cs}{'k' if cs >= KiB else 'b'}-rb{rb}"
            + ("-extl2" if ext else "") + ("-v2" if compat == "0.10" else "")
            + ("-backing" if backing else "") + ("-lazy" if lazy else ""))


def make_image(tmp_path, rng, config, nclusters):
    """The image (size: ``nclusters`` clusters and, where possible, half a
    cluster more) and the content it starts with (the backing file's)."""
    ctype, cs, rb, ext, compat, backing, lazy = config
    size = nclusters * cs + (cs // 2 if cs >= 1024 else 0)
    path = str(tmp_path / "c.qcow2")
    kw = dict(cluster_size=cs, compat=compat, compression_type=ctype, extended_l2=ext)
    if compat != "0.10":
        kw.update(refcount_bits=rb, lazy_refcounts=lazy)
    initial = bytes(size)
    if backing:
        base = qemu_create(tmp_path / "base.qcow2", size, cluster_size=cs)
        with qcow2fast.open(base, "r+") as b:
            initial = rng.randbytes(size)
            b.write(0, initial)
        kw.update(backing_file=base, backing_format="qcow2")
    qcow2fast.create(path, size, **kw)
    return path, size, initial


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_write_compressed_reads_back_in_qemu(tmp_path, rng, config):
    ctype, cs, rb, ext, compat, backing, lazy = config
    path, size, initial = make_image(tmp_path, rng, config, 8)
    data = bytearray(initial)
    comp = [compressible(rng, cs) for _ in range(9)]
    rand = rng.randbytes(cs)
    tail = size - 8 * cs            # a partial last cluster (none with 512-byte clusters)
    with qcow2fast.open(path, "r+", cache_mode="writethrough" if lazy else "writeback") as img:
        assert img.write_compressed(0, comp[0] + comp[1]) == 2 * cs
        img.write_compressed(2 * cs, rand)                      # does not shrink: plain
        if compat != "0.10":
            img.write_zeroes(5 * cs, cs)                        # a zero cluster: allowed
        img.write_compressed(3 * cs, comp[3] + rng.randbytes(cs) + comp[5])
        data[0:2 * cs], data[2 * cs:3 * cs] = comp[0] + comp[1], rand
        data[3 * cs:6 * cs] = img.read(3 * cs, 3 * cs)
        assert data[3 * cs:4 * cs] == comp[3] and data[5 * cs:6 * cs] == comp[5]
        if tail:
            img.write_compressed(8 * cs, comp[8][:tail])        # the last, partial cluster
            data[8 * cs:] = comp[8][:tail]
        assert_bytes_equal(img.read(0, size), data)
        kinds = {e.offset: e.kind for e in img.block_status()}
        assert kinds[0] == kinds[cs] == kinds[3 * cs] == "compressed"
        assert kinds[2 * cs] == "data"
    # A later session packs after what is there (and qemu reads both).
    with qcow2fast.open(path, "r+") as img:
        img.write_compressed(6 * cs, comp[6], Compressor(img.header.compression_type, 9))
        data[6 * cs:7 * cs] = comp[6]
        assert_bytes_equal(img.read(0, size), data)
    qemu_check(path)
    assert_qemu_content(path, bytes(data))
    for c in (0, 1, 3, 5, 6) + ((8,) if tail else ()):
        assert_compressed(path, c * cs)
    for c in (2, 4):
        assert_plain(path, c * cs)
    # qemu overwrites them (in part and whole) and the image stays clean.
    qemu_io(path, f"write -P 0x77 {cs + 100} 300", f"write -P 0x78 {6 * cs} {cs}",
            f"write -P 0x79 {size - 1} 1")
    data[cs + 100:cs + 400] = b"\x77" * 300
    data[6 * cs:7 * cs] = b"\x78" * cs
    data[size - 1] = 0x79
    qemu_check(path)
    assert_qemu_content(path, bytes(data))
    with qcow2fast.open(path) as img:
        assert_bytes_equal(img.read(0, size), data)


@pytest.mark.parametrize("rb", [1, 2, 16])
def test_packing_as_qemu(tmp_path, rng, rb):
    """Payloads are packed at byte granularity (qcow2_alloc_bytes): each
    starts where the previous ended -- straddling host clusters -- until a
    host cluster holds as many as its refcount can count."""
    cs = 4 * KiB
    path = str(tmp_path / "p.qcow2")
    qcow2fast.create(path, 64 * cs, cluster_size=cs, refcount_bits=rb)
    with qcow2fast.open(path, "r+") as img:
        for c in range(40):
            img.write_compressed(c * cs, compressible(rng, cs))
    qemu_check(path)
    cb = header(path)["cluster_bits"]
    ext = []
    for c in range(40):
        (entry,) = read_at(path, l2_entry_offset(path, c * cs), ">Q")
        off, extra = compressed_descriptor(entry, cb)
        ext.append(off)
        assert extra >= 1           # compressible_bytes halves: a payload covers > 1 sector
    per_cluster = {}
    for off in ext:
        per_cluster[off // cs] = per_cluster.get(off // cs, 0) + 1
    assert max(per_cluster.values()) <= (1 << rb) - 1
    if rb == 1:
        assert all(off % cs == 0 for off in ext)
    else:
        straddles = [b for a, b in zip(ext, ext[1:]) if b // cs != a // cs and b % cs]
        assert straddles, "no payload continued in the previous host cluster"
        contiguous = sum(1 for a, b in zip(ext, ext[1:]) if b > a and b - a < cs)
        assert contiguous >= 30


def test_compressed_write_hides_the_backing_file(tmp_path, rng):
    path, size, initial = make_image(tmp_path, rng, CONFIGS[-1], 4)
    with qcow2fast.open(path, "r+") as img:
        img.write_compressed(cs := img.cluster_size, bytes(cs))     # zeros, compressed
        assert img.read(cs, cs) == bytes(cs)
    assert_qemu_content(path, initial[:cs] + bytes(cs) + initial[2 * cs:])
    assert_compressed(path, cs)


def test_internal_snapshot_is_kept(tmp_path, rng):
    """Under an internal snapshot the L2 table is copied first; the
    snapshot's clusters are refused (allocated) until discarded."""
    cs = 4 * KiB
    path = qemu_create(tmp_path / "s.qcow2", MiB, cluster_size=cs)
    qemu_io(path, "write -P 1 0 8k")
    qemu_img("snapshot", "-c", "snap", path)
    text = compressible(rng, 3 * cs)
    with qcow2fast.open(path, "r+") as img:
        with pytest.raises(InvalidArgumentError, match="guest offset 0x0: .*allocated data"):
            img.write_compressed(0, text[:cs])
        img.write_compressed(2 * cs, text[cs:])
        img.discard(0, cs)
        img.write_compressed(0, text[:cs])
    qemu_check(path)
    want = text[:cs] + b"\1" * cs + text[cs:]
    assert_qemu_content(path, want + bytes(MiB - len(want)))
    assert_qemu_content(path, b"\1" * 2 * cs + bytes(MiB - 2 * cs), snapshot="snap")
    for c in (0, 2, 3):
        assert_compressed(path, c * cs)


# -- refusals -------------------------------------------------------------------------


def test_refusals(tmp_path, rng):
    cs = 64 * KiB
    path = str(tmp_path / "r.qcow2")
    qcow2fast.create(path, 8 * cs + 4096, compression_type="zstd")
    with qcow2fast.open(path, "r+") as img:
        img.write(0, b"x" * 10)                                 # cluster 0: data
        img.write_compressed(cs, compressible(rng, cs))         # cluster 1: compressed
        img.write(2 * cs, b"y" * cs)
        img.write_zeroes(2 * cs, cs)                            # cluster 2: zero, allocated
        img.write(5 * cs, b"z")                                 # cluster 5: data
    before = file_state(path)
    with qcow2fast.open(path, "r+") as img:
        for off, what in ((0, "allocated data cluster"), (cs, "compressed cluster"),
                          (2 * cs, "allocated zero cluster")):
            with pytest.raises(InvalidArgumentError, match=f"guest offset {off:#x}.*{what}"):
                img.write_compressed(off, compressible(rng, cs))
        # A request that reaches an allocated cluster writes nothing at all.
        with pytest.raises(InvalidArgumentError, match=f"guest offset {5 * cs:#x}"):
            img.write_compressed(3 * cs, bytes(3 * cs))
        with pytest.raises(InvalidArgumentError, match="not aligned to the cluster size"):
            img.write_compressed(4 * cs + 512, bytes(cs))
        with pytest.raises(InvalidArgumentError, match="not whole clusters"):
            img.write_compressed(4 * cs, bytes(cs + 512))
        with pytest.raises(InvalidArgumentError, match="outside the image"):
            img.write_compressed(8 * cs, bytes(cs))
        with pytest.raises(InvalidArgumentError, match="compression type"):
            img.write_compressed(4 * cs, bytes(cs), Compressor(COMPRESSION_ZLIB))
        with pytest.raises(InvalidArgumentError, match="payload 1 is"):
            img.write_compressed_clusters(4 * cs, [b"x" * 10, b"y" * (cs + 1)])
        with pytest.raises(InvalidArgumentError, match="past the end of the disk"):
            img.write_compressed_clusters(7 * cs, [bytes(cs)] * 3)
        assert img.write_compressed(4 * cs, b"") == 0
    assert file_state(path)[0] == before[0]
    qemu_check(path)
    with qcow2fast.open(path) as img:
        with pytest.raises(ReadOnlyImageError):
            img.write_compressed(4 * cs, bytes(cs))
    # The partial last cluster is accepted (it ends at the end of the disk).
    with qcow2fast.open(path, "r+") as img:
        img.write_compressed(8 * cs, b"z" * 4096, Compressor(COMPRESSION_ZSTD, 19))
    assert_compressed(path, 8 * cs)
    qemu_check(path)


def test_incompressible_over_allocated(tmp_path, rng):
    """A cluster that does not shrink is written plain, even over an
    allocated cluster, as qemu-io's write -c does; a compressible one there
    is refused."""
    cs = 64 * KiB
    path = str(tmp_path / "i.qcow2")
    qcow2fast.create(path, 4 * cs)
    noise = rng.randbytes(2 * cs)
    with qcow2fast.open(path, "r+") as img:
        img.write(0, b"x" * 2 * cs)
        img.write_compressed(0, noise)
        with pytest.raises(InvalidArgumentError, match="allocated data cluster"):
            img.write_compressed(0, noise[:cs] + bytes(cs))     # the second one shrinks
    assert_qemu_content(path, noise + bytes(2 * cs))
    qemu_check(path)


# -- random mix over the model --------------------------------------------------------


@pytest.mark.parametrize("config", [CONFIGS[4], CONFIGS[7], CONFIGS[9], CONFIGS[10]],
                         ids=config_id)
def test_random_mix_with_other_writes(tmp_path, config):
    """write_compressed (after a discard, so that nothing is allocated)
    mixed with random writes, zeroes, discards and flushes, in two
    sessions; the model is read back by us and by qemu."""
    rng = Rng(config_id(config))
    path, size, initial = make_image(tmp_path, rng, config, 24)
    backing = initial if config[5] else None
    data = initial
    for session in range(2):
        with qcow2fast.open(path, "r+") as img:
            cs = img.cluster_size
            m = ModelImage(img, data, backing)
            m.check_all()
            for _ in range(50):
                if rng.random() < 0.5:
                    m.random_ops(rng, 2)
                    continue
                c = rng.randrange(0, -(-size // cs))
                n = min(rng.randint(1, 3) * cs, size - c * cs)
                m.discard(c * cs, n)
                parts = [compressible(rng, cs) if rng.random() < 0.8 else rng.randbytes(cs)
                         for _ in range(-(-n // cs))]
                m.write_compressed(c * cs, b"".join(parts)[:n])
            m.check_all()
            data = bytes(m.data)
        qemu_check(path)
    assert_qemu_content(path, data)


# -- the property machine, with compressed writes (ours and qemu's) -------------------


class CompressedWriteMachine(Qcow2Machine):
    """test_properties' machine (random geometry, backing files, qemu-io
    sessions, internal snapshots) plus compressed writes: ours after a
    discard, and qemu-io's ``write -c`` after one."""

    def _clusters(self, data):
        cs, size = self.cs, self.m.size
        c = data.draw(st.integers(0, (size - 1) // cs))
        return c * cs, min(data.draw(st.integers(1, 3)) * cs, size - c * cs)

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data(), kind=st.sampled_from(["compressible", "random", "pattern"]))
    def write_compressed(self, data, kind):
        off, n = self._clusters(data)
        if kind == "compressible":
            payload = compressible(self.rng, n)
        elif kind == "random":
            payload = self.rng.randbytes(n)
        else:
            payload = bytes([data.draw(st.integers(0, 255))]) * n
        self.m.discard(off, n)
        self.m.write_compressed(off, payload)

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data(), pat=st.integers(0, 255))
    def qemu_write_compressed(self, data, pat):
        off, n = self._clusters(data)
        # Our discard frees the clusters (qemu's write -z -u would not
        # free a compressed cluster that the request covers only in part,
        # as at the end of the disk with subclusters).
        self.m.discard(off, n)
        self.img.close()
        cmd = f"write -q -c -P {pat} {off} {n}"
        qemu_io(self.path, cmd)
        self.m.data[off:off + n] = bytes([pat]) * n
        self.m.log.append(("qemu-io", cmd))
        self.img = qcow2fast.open(self.path, "r+")
        self.m.img = self.img
        self.m.check_all()


    @precondition(lambda self: self.img is not None and self.rb >= 16
                  and len(self.snapshots) < 3)
    @rule()
    def qemu_snapshot(self):
        """Only with refcounts wide enough: a host cluster packed with
        compressed clusters up to the refcount maximum (qemu does the same)
        cannot take a snapshot's extra references (qemu-img snapshot -c
        fails with EINVAL)."""
        super().qemu_snapshot()


class CompressedWriteExtendedL2Machine(CompressedWriteMachine):
    extended_l2 = True


MACHINE_SETTINGS = settings(SETTINGS, max_examples=int(os.environ.get("QCOW2FAST_EXAMPLES",
                                                                      "25")))


@pytest.mark.parametrize("machine", [CompressedWriteMachine, CompressedWriteExtendedL2Machine],
                         ids=["standard", "extended_l2"])
def test_random_sequences_with_compressed_writes(tmp_path, machine):
    machine.workdir = str(tmp_path)
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)
