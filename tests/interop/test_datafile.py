"""External data files (data_file, data_file_raw) against qemu-img/qemu-io
7.2, both ways: what qemu writes reads bit-exactly, what qcow2fast writes
qemu reads, checks clean and compares equal; bad input is a clear error."""

import os
import random

import pytest

import qcow2fast
from qcow2fast.fsck.check import check_image
from qcow2fast.errors import (CorruptImageError, InvalidArgumentError, UnsupportedFeatureError,
                              UntrustedImageError)
from tests.helpers.qemu_util import (INCOMPAT_DATA_FILE, QEMU_IO, file_state, header,
                                     l2_entry_offset, patch, qemu_check, qemu_compare,
                                     qemu_create, qemu_img, qemu_io, qemu_map, qemu_raw,
                                     read_extensions, run, write_extensions)

pytestmark = pytest.mark.qemu
KiB, MiB = 1 << 10, 1 << 20
EXT_DATA_FILE = 0x44415441

# (cluster size, extended L2, raw): 4 KiB to 2 MiB
MATRIX = [(4 * KiB, False, False), (16 * KiB, True, True), (64 * KiB, False, True),
          (64 * KiB, True, False), (2 * MiB, False, False), (2 * MiB, True, True)]


def _ops(cs, size):
    """(kind, offset, length) writes, zeroes and discards over a few clusters,
    cluster 0 included (host offset 0 in the data file)."""
    rng = random.Random(cs)
    out = [("write", 0, 3000), ("write", cs - 512, 1536), ("zero", 2 * cs, cs),
           ("write", 4 * cs + 700, 5000), ("discard", 4 * cs, cs), ("write", size - 4096, 4096)]
    for _ in range(6):
        off = rng.randrange(0, size - 8192) // 512 * 512
        out.append((rng.choice(["write", "write", "zero"]), off, rng.randrange(1, 16) * 512))
    return out


def _model_apply(model, ops, size):
    for k, (kind, off, n) in enumerate(ops):
        n = min(n, size - off)
        if kind == "write":
            model[off:off + n] = bytes([k + 1]) * n
        elif kind == "zero":
            model[off:off + n] = bytes(n)
        # a discard leaves what qemu leaves: compared against qemu, not the model


@pytest.mark.parametrize("cs,ext,raw", MATRIX, ids=lambda v: str(v))
def test_qcow2fast_writes_qemu_reads(tmp_path, cs, ext, raw):
    size = 24 * cs + 4096
    img_path, data = str(tmp_path / "a.qcow2"), str(tmp_path / "a.raw")
    qcow2fast.create(img_path, size, cluster_size=cs, extended_l2=ext, data_file=data,
                     data_file_raw=raw)
    model = bytearray(size)
    ops = [o for o in _ops(cs, size) if o[0] != "discard"]
    with qcow2fast.open(img_path, "r+") as img:
        for k, (kind, off, n) in enumerate(ops):
            n = min(n, size - off)
            if kind == "write":
                img.write(off, bytes([k + 1]) * n)
            else:
                img.write_zeroes(off, n)
        _model_apply(model, ops, size)
        assert img.read(0, size) == model
    assert header(img_path)["incompatible_features"] & INCOMPAT_DATA_FILE
    qemu_check(img_path)
    qemu_compare(img_path, bytes(model))
    info = qemu_img("info", "--output=json", img_path).stdout_text
    assert f'"data-file-raw": {"true" if raw else "false"}' in info
    if raw:     # the data file is the disk, byte for byte
        with open(data, "rb") as f:
            assert f.read().ljust(size, b"\0")[:size] == model
    # the host offsets are the guest offsets, in the data file
    for e in qemu_map(img_path):
        if e["data"]:
            assert e["offset"] == e["start"]


@pytest.mark.parametrize("cs,ext,raw", MATRIX, ids=lambda v: str(v))
def test_qemu_writes_qcow2fast_reads(tmp_path, cs, ext, raw):
    size = 24 * cs + 4096
    img_path, data = str(tmp_path / "q.qcow2"), str(tmp_path / "q.raw")
    qemu_create(img_path, size, cluster_size=cs, extended_l2="on" if ext else "off",
                data_file=data, data_file_raw="on" if raw else "off")
    cmds = []
    for k, (kind, off, n) in enumerate(_ops(cs, size)):
        n = min(n, size - off)
        if kind == "write":
            cmds.append(f"write -P {k + 1} {off} {n}")
        elif kind == "zero":
            cmds.append(f"write -z {off} {n}")
        else:
            cmds.append(f"discard {off} {n}")
    qemu_io(img_path, *cmds)
    expected = qemu_raw(img_path)
    with qcow2fast.open(img_path) as img:
        assert img.read(0, size) == expected
        # map: same allocation as qemu sees
        assert [(e.offset, e.length) for e in img.block_status() if e.kind == "data"] == \
            [(e["start"], e["length"]) for e in _merged(qemu_map(img_path)) if e["data"]]
    # and qcow2fast goes on writing it: qemu still reads it
    with qcow2fast.open(img_path, "r+") as img:
        img.write(cs // 2, b"z" * cs)
        img.discard(8 * cs, 2 * cs)
        expected = img.read(0, size)
    qemu_check(img_path)
    qemu_compare(img_path, expected)


def _merged(entries):
    out = []
    for e in entries:
        if out and out[-1]["data"] == e["data"] and out[-1]["start"] + out[-1]["length"] \
                == e["start"]:
            out[-1] = dict(out[-1], length=out[-1]["length"] + e["length"])
        else:
            out.append(dict(e))
    return out


def test_raw_zeroes_and_discard_reach_the_data_file(tmp_path):
    """data_file_raw: zeros are written into the data file as qemu writes
    them; a discard punches it."""
    p, d = str(tmp_path / "r.qcow2"), str(tmp_path / "r.raw")
    qcow2fast.create(p, 2 * MiB, data_file=d, data_file_raw=True)
    with qcow2fast.open(p, "r+") as img:
        img.write(0, b"\xab" * MiB)
        img.write_zeroes(128 * KiB, 64 * KiB)
        img.write_zeroes(256 * KiB, 64 * KiB, may_unmap=True)
        img.discard(512 * KiB, 64 * KiB)
    with open(d, "rb") as f:
        raw = f.read()
    for off in (128 * KiB, 256 * KiB, 512 * KiB):
        assert raw[off:off + 64 * KiB] == bytes(64 * KiB)
    assert raw[:128 * KiB] == b"\xab" * (128 * KiB)
    qemu_compare(p, d)          # the raw file is the disk
    assert qemu_img("info", p).stdout_text.count("data file raw: true") == 1


def test_preallocation_resize_and_flush(tmp_path):
    for mode in ("metadata", "falloc", "full"):
        p, d = str(tmp_path / f"{mode}.qcow2"), str(tmp_path / f"{mode}.raw")
        qcow2fast.create(p, 1 * MiB, data_file=d, preallocation=mode)
        q, qd = str(tmp_path / f"q{mode}.qcow2"), str(tmp_path / f"q{mode}.raw")
        qemu_create(q, MiB, data_file=qd, preallocation=mode)
        assert qemu_map(p) == qemu_map(q)
        assert os.path.getsize(d) == os.path.getsize(qd)
        qemu_check(p)
    # resize follows the data file as qemu's qcow2_co_truncate
    p, d = str(tmp_path / "g.qcow2"), str(tmp_path / "g.raw")
    q, qd = str(tmp_path / "qg.qcow2"), str(tmp_path / "qg.raw")
    for raw in (False, True):
        qcow2fast.create(p, MiB, data_file=d, data_file_raw=raw)
        qemu_create(q, MiB, data_file=qd, data_file_raw="on" if raw else "off")
        with qcow2fast.open(p, "r+") as img:
            img.write(0, b"x" * 4096)
            img.resize(3 * MiB)
            img.flush()
        qemu_io(q, "write -P 0x78 0 4k")
        qemu_img("resize", q, str(3 * MiB))
        assert os.path.getsize(d) == os.path.getsize(qd)
        assert qemu_map(p) == qemu_map(q)
        qemu_compare(p, qemu_raw(q))
        with qcow2fast.open(p, "r+") as img:
            img.resize(MiB, shrink=True)
        qemu_img("resize", "--shrink", q, str(MiB))
        assert os.path.getsize(d) == os.path.getsize(qd)
        qemu_check(p)


def test_chain_with_a_data_file_layer(tmp_path):
    """base (data file) <- top (plain), written both ways."""
    base, bd = str(tmp_path / "base.qcow2"), str(tmp_path / "base.raw")
    qemu_create(base, 2 * MiB, data_file=bd)
    qemu_io(base, "write -P 1 0 1M", "write -z 1M 64k")
    top = str(tmp_path / "top.qcow2")
    qcow2fast.create(top, 2 * MiB, backing_file="base.qcow2", backing_format="qcow2")
    with qcow2fast.open(top, "r+") as img:
        img.write(4096, b"t" * 70000)
        expected = img.read(0, 2 * MiB)
    assert expected[:4096] == b"\1" * 4096
    qemu_compare(top, expected)
    # and a data-file layer on top of a plain base
    t2, t2d = str(tmp_path / "t2.qcow2"), str(tmp_path / "t2.raw")
    qcow2fast.create(t2, 2 * MiB, backing_file="top.qcow2", backing_format="qcow2",
                     data_file=t2d)
    with qcow2fast.open(t2, "r+") as img:
        img.write(MiB - 100, b"u" * 300)        # copy-on-write from the layers below
        expected = img.read(0, 2 * MiB)
    qemu_check(t2)
    qemu_compare(t2, expected)


def test_open_override_and_relative_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("sub")
    qemu_create("sub/a.qcow2", MiB, data_file="d.raw")     # created here, named "d.raw"
    os.rename("d.raw", "sub/d.raw")
    with qcow2fast.open("sub/a.qcow2", "r+") as img:       # resolved in the image's directory
        img.write(0, b"\5" * 4096)
    os.rename("sub/d.raw", "other.raw")
    with pytest.raises(FileNotFoundError, match="data_file"):
        qcow2fast.open("sub/a.qcow2")
    with qcow2fast.open("sub/a.qcow2", data_file="other.raw") as img:
        assert img.read(0, 4096) == b"\5" * 4096
    # qemu reads what qcow2fast wrote through the same override
    out = run([QEMU_IO, "--image-opts", "-c", "read -P 5 0 4k",
               "driver=qcow2,file.filename=sub/a.qcow2,data-file.filename=other.raw"])
    assert "Pattern verification failed" not in out.stdout_text
    plain = qemu_create(tmp_path / "plain.qcow2", MiB)
    with pytest.raises(InvalidArgumentError, match="external data file"):
        qcow2fast.open(plain, data_file="other.raw")


def test_untrusted_names(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    for name, ok in ((str(tmp_path / "abs.raw"), False), ("../up.raw", False),
                     ("in.raw", True)):
        p = str(d / "x.qcow2")
        qcow2fast.create(p, MiB, data_file=name if os.path.isabs(name) else str(d / name))
        exts, _ = read_extensions(p)
        write_extensions(p, [(t, name.encode() if t == EXT_DATA_FILE else v) for t, v in exts])
        if not os.path.isabs(name):
            open(d / name, "ab").close()
        if ok:
            qcow2fast.open(p, untrusted=True).close()
        else:
            with pytest.raises(UntrustedImageError, match="external data file"):
                qcow2fast.open(p, untrusted=True)
            qcow2fast.open(p).close()       # trusted: opened as qemu does


def test_bad_input(tmp_path):
    p, d = str(tmp_path / "b.qcow2"), str(tmp_path / "b.raw")
    qemu_create(p, MiB, data_file=d)
    qemu_io(p, "write -P 3 0 128k")
    # a data file shorter than the mapping reads zeros there (qemu too)
    os.truncate(d, 100 * KiB)
    with qcow2fast.open(p) as img:
        assert img.read(96 * KiB, 8 * KiB) == b"\3" * 4 * KiB + bytes(4 * KiB)
    assert qemu_raw(p)[96 * KiB:104 * KiB] == b"\3" * 4 * KiB + bytes(4 * KiB)
    # the bit without the name
    exts, _ = read_extensions(p)
    before = file_state(p)
    write_extensions(p, [e for e in exts if e[0] != EXT_DATA_FILE])
    changed = file_state(p)
    with pytest.raises(UnsupportedFeatureError, match="'data-file' is required"):
        qcow2fast.open(p, "r+")
    assert file_state(p) == changed
    # a name that is not UTF-8, or too long
    for bad, why in ((b"\xff\xfe.raw", "UTF-8"), (b"x" * 4096, "longer")):
        write_extensions(p, [(t, bad if t == EXT_DATA_FILE else v) for t, v in exts])
        state = file_state(p)
        with pytest.raises(CorruptImageError, match=why) as e:
            qcow2fast.open(p, "r+")
        assert e.value.field == "data_file" and file_state(p) == state
    write_extensions(p, exts)
    assert before != changed
    # compressed clusters: refused to write (qemu: ENOTSUP), an error to read
    with qcow2fast.open(p, "r+") as img:
        with pytest.raises(UnsupportedFeatureError, match="Operation not supported"):
            img.write_compressed(0, bytes(64 * KiB))
        with pytest.raises(UnsupportedFeatureError, match="Operation not supported"):
            img.create_snapshot("s1")
    assert "Operation not supported" in qemu_img("snapshot", "-c", "s1", p,
                                                 check=False).stderr_text
    loc = l2_entry_offset(p, 64 * KiB)
    patch(p, loc, ">Q", (1 << 62) | 0x50000)       # a compressed descriptor
    with qcow2fast.open(p) as img:
        with pytest.raises(CorruptImageError, match="compressed"):
            img.read(64 * KiB, 4096)
    out = qemu_img("check", p, check=False)
    assert out.returncode == 2 and "with data file" in out.stderr_text + out.stdout_text
    res = check_image(p)        # qcow2fast's check says the same
    assert res.corruptions == 1 and any("with data file" in m for m in res.messages)
    assert res.allocated_clusters == 1


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
def test_partial_zeroes_in_guest_cluster_0(tmp_path, monkeypatch, raw):
    """Guest cluster 0 lies at host offset 0 of the data file: the Python
    write path (partial write_zeroes edges, lazy-refcount and subcluster
    writes) took that host offset for "none" and wrote the data at the
    start of the cluster instead of where it belonged (found by the crash
    states of datafile-writethrough-64k).  qemu-io does the same on a copy;
    the two compare equal."""
    monkeypatch.chdir(tmp_path)     # (qemu 7.2 opens a relative data file name from the cwd)
    ours = str(tmp_path / "a.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             f"data_file=a.data,data_file_raw={'on' if raw else 'off'}", ours, "1M")
    qemu_io(ours, "write -P 0x11 0 64k", "write -P 0x22 64k 64k")
    with qcow2fast.open(ours, "r+") as img:
        img.write_zeroes(22016, 42496, may_unmap=True)
        img.write_zeroes(65536 + 22016, 4096)
    got = qemu_raw(ours)
    want = bytearray(b"\x11" * 65536 + b"\x22" * 65536 + bytes(1 * MiB - 2 * 65536))
    want[22016:22016 + 42496] = bytes(42496)
    want[65536 + 22016:65536 + 22016 + 4096] = bytes(4096)
    assert got == bytes(want)
    qemu_check(ours)


def _data_extents(path):
    """The file's allocated ranges (SEEK_DATA/SEEK_HOLE)."""
    out, fd = [], os.open(path, os.O_RDONLY)
    try:
        off = 0
        while True:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                return out
            off = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, off))
    finally:
        os.close(fd)


@pytest.mark.parametrize("raw,ext", [(False, False), (False, True), (True, False)])
def test_first_partial_write_into_a_cluster_as_qemu(tmp_path, raw, ext):
    """The first write into a fresh cluster of a data-file image, smaller
    than the cluster (over a backing file when the data file is not raw):
    the data file, its allocation, the map and the guest view as qemu-io's
    (both images made by create(): qemu's file creation would also write
    the data file's first block, allocate_first_block)."""
    base = tmp_path / "base.qcow2"
    qemu_create(base, 1 * MiB)
    qemu_io(base, "write -P 0x33 0 1M")
    cmds = [("write", 4 * KiB, 4 * KiB), ("write", 130 * KiB, 512), ("zero", 200 * KiB, 8 * KiB)]
    made = {}
    for who in ("qemu", "ours"):
        path, data = tmp_path / f"{who}.qcow2", tmp_path / f"{who}.raw"
        backing = {} if raw else {"backing_file": "base.qcow2", "backing_format": "qcow2"}
        qcow2fast.create(path, MiB, data_file=str(data), data_file_raw=raw, extended_l2=ext,
                         **backing)
        if who == "qemu":
            qemu_io(path, *(f"write -P 0x11 {o} {n}" if k == "write" else f"write -z {o} {n}"
                            for k, o, n in cmds))
        else:
            with qcow2fast.open(path, "r+") as img:
                for k, o, n in cmds:
                    img.write(o, b"\x11" * n) if k == "write" else img.write_zeroes(o, n)
        made[who] = (path, data)
    (qp, qd), (op, od) = made["qemu"], made["ours"]
    qemu_check(op)
    assert qemu_img("compare", str(qp), str(op)).returncode == 0
    assert qd.read_bytes() == od.read_bytes()
    assert _data_extents(qd) == _data_extents(od)
    assert qemu_map(qp) == qemu_map(op)


@pytest.mark.parametrize("raw", [False, True])
def test_encrypted_data_file_is_never_punched(tmp_path, raw):
    """LUKS with a data file: a discard or an unmapping zero leaves the data
    file's ciphertext as it was (zeros read through the old L2 entry, if a
    crash kept it, would decrypt to noise: engine/datafile.py), while both
    qemu and qcow2fast read zeros there and qemu checks the image clean.
    (crash states: luks-datafile-writeback-64k, seed 4000, failed before.)"""
    cs = 64 * KiB
    obj = ["--object", "secret,id=sec0,data=pw"]
    p, d = str(tmp_path / "img.qcow2"), str(tmp_path / "img.data")
    run(["qemu-img", "create", "-q", "-f", "qcow2", *obj, "-o",
         "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50,"
         f"data_file={d},data_file_raw={'on' if raw else 'off'}", p, "1M"])
    with qcow2fast.open(p, "r+", key_secret="pw") as img:
        img.write(0, os.urandom(4 * cs))
    before = open(d, "rb").read()
    with qcow2fast.open(p, "r+", key_secret="pw") as img:
        img.discard(cs, cs)
        img.write_zeroes(2 * cs, cs, may_unmap=True)
        assert img.read(cs, 2 * cs) == bytes(2 * cs)
    assert open(d, "rb").read()[:4 * cs] == before[:4 * cs], "the data file was punched"
    opts = f"driver=qcow2,file.filename={p},encrypt.key-secret=sec0"
    got = run([QEMU_IO, *obj, "--image-opts", opts, "-c", f"read -P 0 {cs} {2 * cs}"])
    assert "verification failed" not in got.stdout_text
    run(["qemu-img", "check", *obj, "--image-opts", opts])
