"""Internal snapshots, both ways with qemu-img 7.2.

Snapshots qcow2fast creates are listed, read (convert -l), applied and
deleted by qemu-img; snapshots qemu-img creates are applied and deleted by
qcow2fast.  After every step qemu-img check is clean and the active disk
and every snapshot equal the model.  Also: VM state (qemu-io's vmstate
reads and writes), refcount overflow, bad input, and the command line
against qemu-img's output."""

import io
import json
import shutil

import pytest

import qcow2fast
from qcow2fast.errors import (CorruptImageError, InvalidArgumentError, LimitExceededError,
                              ReadOnlyImageError)
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import (INCOMPAT_CORRUPT, H_INCOMPATIBLE, Rng, assert_bytes_equal,
                                     file_state, header, patch, qemu_check, qemu_create,
                                     qemu_img, qemu_info, qemu_io, qemu_raw)

pytestmark = pytest.mark.qemu
KiB, MiB = 1 << 10, 1 << 20

# (cluster size, refcount bits, compat, extended L2, lazy refcounts)
GEOMETRIES = [(65536, 16, "1.1", False, False), (512, 4, "1.1", False, False),
              (4096, 64, "1.1", False, True), (65536, 16, "0.10", False, False),
              (32768, 8, "1.1", True, False), (2 * MiB, 16, "1.1", False, False)]


def geom_id(g):
    cs, rb, compat, ext, lazy = g
    return f"cs{cs}-rb{rb}-{compat}" + ("-extl2" if ext else "") + ("-lazy" if lazy else "")


class Model:
    """Expected content of the active disk and of each snapshot, checked
    through qemu after every step."""

    def __init__(self, path, size):
        self.path, self.active, self.snaps = path, bytearray(size), {}

    def verify(self):
        qemu_check(self.path)
        assert_bytes_equal(qemu_raw(self.path), bytes(self.active), "active disk")
        listed = {s["name"] for s in qemu_info(self.path).get("snapshots", [])}
        assert listed == set(self.snaps), (listed, set(self.snaps))
        for name, content in self.snaps.items():
            assert_bytes_equal(qemu_raw(self.path, snapshot=name), content, f"snapshot {name}")
        with qcow2fast.open(self.path) as img:
            assert_bytes_equal(img.read(0, img.size), bytes(self.active), "qcow2fast's view")
            for s in img.snapshots:
                with qcow2fast.open(self.path, snapshot=s.name) as view:
                    assert_bytes_equal(view.read(0, view.size), self.snaps[s.name],
                                       f"qcow2fast's view of {s.name}")


def mixed_writes(img, model, rng, n=6):
    """Data, zeroes, discards and (where allowed) compressed clusters."""
    cs, size = img.cluster_size, img.size
    for _ in range(n):
        off, length = rng.span(size, 3 * cs + 100)
        what = rng.choice(["data", "data", "zero", "discard", "compressed"])
        if what == "data":
            data = rng.randbytes(length)
            img.write(off, data)
            model.active[off:off + length] = data
        elif what == "zero":
            img.write_zeroes(off, length)
            model.active[off:off + length] = bytes(length)
        elif what == "discard" and img.version >= 3:
            img.discard(off, length)
            a = -(-off // img.geo.subcluster_size) * img.geo.subcluster_size
            b = (off + length) // img.geo.subcluster_size * img.geo.subcluster_size
            if off + length == size:
                b = size
            if b > a:
                model.active[a:b] = bytes(b - a)
        elif what == "compressed" and not img.geo.extended_l2 and img.refcount_bits >= 8:
            # (several compressed clusters share a host cluster: with narrow
            # refcounts a snapshot of them overflows, in qemu too)
            c = off // cs * cs
            n_bytes = min(cs, size - c)
            data = bytes([rng.randrange(4)]) * n_bytes
            img.write_zeroes(c, n_bytes, may_unmap=True)     # compressed: where nothing is
            img.write_compressed(c, data)
            model.active[c:c + n_bytes] = data


def make(tmp_path, g, size=None):
    cs, rb, compat, ext, lazy = g
    size = size or max(4 * MiB, 24 * cs) + 4096
    path = str(tmp_path / "img.qcow2")
    qcow2fast.create(path, size, cluster_size=cs, refcount_bits=rb, compat=compat,
                     extended_l2=ext, lazy_refcounts=lazy)
    return path, size


@pytest.mark.parametrize("g", GEOMETRIES, ids=geom_id)
def test_qcow2fast_snapshots_seen_by_qemu(tmp_path, g):
    """qcow2fast creates/applies/deletes; qemu-img lists, reads, applies, deletes."""
    path, size = make(tmp_path, g)
    rng = Rng(hash(geom_id(g)) & 0xFFFF)
    m = Model(path, size)
    names = ["one", "two", "three"]
    with qcow2fast.open(path, "r+") as img:
        mixed_writes(img, m, rng)
        for name in names:
            img.create_snapshot(name)
            m.snaps[name] = bytes(m.active)
            mixed_writes(img, m, rng)
    m.verify()
    # qemu applies one of ours, then writes, then deletes one.
    qemu_img("snapshot", "-a", names[0], path)
    m.active[:] = m.snaps[names[0]]
    m.verify()
    qemu_io(path, f"write -P 0x5a {size // 3} {g[0] + 17}")
    m.active[size // 3:size // 3 + g[0] + 17] = b"\x5a" * (g[0] + 17)
    qemu_img("snapshot", "-d", names[-1], path)
    del m.snaps[names[-1]]
    m.verify()
    # qcow2fast applies and deletes the rest.
    with qcow2fast.open(path, "r+") as img:
        img.apply_snapshot(names[0])
        m.active[:] = m.snaps[names[0]]
        mixed_writes(img, m, rng, 3)
        for name in names[:-1]:
            img.delete_snapshot(name)
            del m.snaps[name]
        assert img.snapshots == []
    m.verify()


@pytest.mark.parametrize("g", GEOMETRIES[:3] + GEOMETRIES[4:5], ids=geom_id)
def test_qemu_snapshots_applied_by_qcow2fast(tmp_path, g):
    cs, rb, compat, ext, lazy = g
    size = max(4 * MiB, 24 * cs)
    path = str(tmp_path / "q.qcow2")
    opts = {"extended_l2": "on"} if ext else {}
    qemu_create(path, size, cluster_size=cs, refcount_bits=rb, compat=compat, **opts)
    m = Model(path, size)
    qemu_io(path, f"write -P 1 0 {3 * cs}", f"write -c -P 2 {4 * cs} {cs}" if not ext
            else f"write -P 2 {4 * cs} {cs}", f"write -z {cs} {cs}")
    m.active[0:3 * cs] = b"\1" * (3 * cs)
    m.active[4 * cs:5 * cs] = b"\2" * cs
    m.active[cs:2 * cs] = bytes(cs)
    qemu_img("snapshot", "-c", "q1", path)
    m.snaps["q1"] = bytes(m.active)
    qemu_io(path, f"write -P 3 {cs // 2} {2 * cs}")
    m.active[cs // 2:cs // 2 + 2 * cs] = b"\3" * (2 * cs)
    if rb > 2:
        qemu_img("snapshot", "-c", "q2", path)
        m.snaps["q2"] = bytes(m.active)
    m.verify()
    with qcow2fast.open(path, "r+") as img:
        img.apply_snapshot("q1")
        m.active[:] = m.snaps["q1"]
        img.write(0, b"\4" * 100)
        m.active[:100] = b"\4" * 100
    m.verify()
    with qcow2fast.open(path, "r+") as img:
        img.delete_snapshot("q1")
        del m.snaps["q1"]
    m.verify()
    if "q2" in m.snaps:
        with qcow2fast.open(path, "r+") as img:
            img.apply_snapshot("q2")
            m.active[:] = m.snaps["q2"]
            img.delete_snapshot("q2")
            del m.snaps["q2"]
        m.verify()


def test_vm_state_both_ways(tmp_path):
    """VM state is stored where qemu stores it: qemu-io reads it (read -b)
    after qemu-img applies the snapshot, and qcow2fast reads what qemu-io
    wrote (write -b)."""
    path, size = make(tmp_path, (65536, 16, "1.1", False, False), 3 * MiB + 512)
    rng = Rng(7)
    state = bytearray(rng.randbytes(300 * KiB + 5))
    state[128 * KiB:192 * KiB] = b"\x3c" * (64 * KiB)
    state = bytes(state)
    with qcow2fast.open(path, "r+") as img:
        img.write(0, b"d" * 4096)
        sn = img.create_snapshot("vm", vm_state=io.BytesIO(state), vm_clock_nsec=3_723_004_000_000,
                                 icount=42)
        assert sn.vm_state_size == len(state)
        img.write(0, b"e" * 4096)
        assert img.read_vmstate("vm", 1000, 5000) == state[1000:6000]
        # savevm's way: write the state, then create with its size
        img.write_vmstate(0, b"second" * 1000)
        img.create_snapshot("vm2", vm_state=6000)
        assert img.read_vmstate("vm2", 0, 6000) == b"second" * 1000
    qemu_check(path)
    info = {s["name"]: s for s in qemu_info(path)["snapshots"]}
    assert info["vm"]["vm-state-size"] == len(state)
    assert info["vm"]["icount"] == 42
    assert (info["vm"]["vm-clock-sec"], info["vm"]["vm-clock-nsec"]) == (3723, 4_000_000)
    assert "icount" not in info["vm2"]
    qemu_img("snapshot", "-a", "vm", path)
    # The state holds a patterned run qemu-io can verify (read -b -P).
    qemu_io(path, f"read -b -P 0x3c {128 * KiB} {64 * KiB}")
    bad = qemu_io(path, f"read -b -P 0x3d {128 * KiB} {64 * KiB}", check=False)
    assert "failed" in bad.stdout_text + bad.stderr_text
    qemu_io(path, "write -b -P 0x77 4096 8192")
    with qcow2fast.open(path, "r+") as img:
        assert img.read_vmstate(None, 4096, 8192) == b"\x77" * 8192
        assert img.read(0, 4096) == b"d" * 4096
    qemu_check(path)


@pytest.mark.parametrize("rb,allowed", [(1, 0), (2, 2)])
def test_refcount_overflow_refused(tmp_path, rb, allowed):
    """refcount_bits=1: no snapshot of a non-empty disk; 2: two, not three.
    qemu's message at the command line, nothing written."""
    path, size = make(tmp_path, (65536, rb, "1.1", False, False))
    with qcow2fast.open(path, "r+") as img:
        img.write(0, b"x" * 70000)
        for i in range(allowed):
            img.create_snapshot(f"s{i}")
    before = file_state(path)
    with qcow2fast.open(path, "r+") as img:
        with pytest.raises(LimitExceededError, match="refcount"):
            img.create_snapshot("over")
    assert file_state(path)[0] == before[0]
    qemu_check(path)
    ref = tmp_path / "ref.qcow2"
    shutil.copy(path, ref)
    q = qemu_img("snapshot", "-c", "over", str(ref), check=False)
    assert q.returncode == 1


def test_cli_matches_qemu_img(tmp_path, capsys):
    """snapshot -l byte for byte, info (human, JSON), messages and statuses."""
    path, size = make(tmp_path, (65536, 16, "1.1", False, False))
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(path, ref)
    for p in (path, ref):
        qemu_io(p, "write -P 9 0 100k")
    status, out, err = run_cli(capsys, "snapshot", "-c", "first", path)
    assert (status, out, err) == (0, "", "")
    qemu_img("snapshot", "-c", "first", ref)
    run_cli(capsys, "snapshot", "-c", "first", path)        # a duplicate name, as qemu allows
    qemu_img("snapshot", "-c", "first", ref)
    ours = qemu_img("snapshot", "-l", path).stdout_text
    status, out, _ = run_cli(capsys, "snapshot", "-l", path)
    assert status == 0 and out == ours
    # Both files: same table apart from the dates.
    q, o = qemu_info(ref), qemu_info(path)
    for s in q["snapshots"] + o["snapshots"]:
        s.pop("date-sec"), s.pop("date-nsec")
    assert q["snapshots"] == o["snapshots"]
    status, out, _ = run_cli(capsys, "info", "--output=json", path)
    assert json.loads(out)["snapshots"] == qemu_info(path)["snapshots"]
    status, out, _ = run_cli(capsys, "info", path)
    assert out == qemu_img("info", path).stdout_text
    for args in (["-a", "nope"], ["-d", "nope"], ["-d", "1"], ["-l", "-c", "x"],
                 ["-U", "-c", "x"], []):
        argv = ["snapshot", *args, path] if args != [] else ["snapshot"]
        q = qemu_img(*argv, check=False)
        status, out, err = run_cli(capsys, *argv)
        assert status == q.returncode, (argv, status, q.returncode)
        ours = err.replace("qcow2fast: ", "qemu-img: ").replace("'qcow2fast --help'",
                                                                 "'qemu-img --help'")
        assert ours == q.stderr_text, (argv, err, q.stderr_text)
    status, _, _ = run_cli(capsys, "snapshot", "-a", "1", path)     # -a takes an id
    assert status == 0
    status, _, _ = run_cli(capsys, "snapshot", "-d", "first", path)
    assert status == 0
    qemu_check(path)
    assert [s["id"] for s in qemu_info(path)["snapshots"]] == ["2"]


def test_bad_input_writes_nothing(tmp_path):
    path, size = make(tmp_path, (65536, 16, "1.1", False, False))
    with qcow2fast.open(path, "r+") as img:
        img.write(0, b"a" * 5000)
        img.create_snapshot("s")
    before = file_state(path)[0]
    with qcow2fast.open(path, "r+") as img:
        for call, exc in ((lambda: img.apply_snapshot("missing"), InvalidArgumentError),
                          (lambda: img.delete_snapshot("missing"), InvalidArgumentError),
                          (lambda: img.create_snapshot("s"), InvalidArgumentError),
                          (lambda: img.create_snapshot("t", id="1"), InvalidArgumentError),
                          (lambda: img.rename_snapshot("missing", "x"), InvalidArgumentError),
                          (lambda: img.read_vmstate("s", 0, 1), InvalidArgumentError)):
            with pytest.raises(exc):
                call()
    assert file_state(path)[0] == before
    with qcow2fast.open(path) as img:
        for call in (lambda: img.create_snapshot("x"), lambda: img.apply_snapshot("s"),
                     lambda: img.delete_snapshot("s"), lambda: img.write_vmstate(0, b"x")):
            with pytest.raises(ReadOnlyImageError):
                call()
    assert file_state(path)[0] == before
    # A marked-corrupt image opens read-only: snapshots are refused.
    patch(path, H_INCOMPATIBLE, ">Q", header(path)["incompatible_features"] | INCOMPAT_CORRUPT)
    before = file_state(path)[0]
    with qcow2fast.open(path, "r+") as img:
        with pytest.raises(ReadOnlyImageError):
            img.create_snapshot("x")
    assert file_state(path)[0] == before


def test_corrupt_l2_refused_before_writing(tmp_path):
    """An L2 entry pointing past the end of the file: create refuses with
    the table named, and writes nothing."""
    path, size = make(tmp_path, (65536, 16, "1.1", False, False))
    with qcow2fast.open(path, "r+") as img:
        img.write(0, b"a" * 5000)
        l2 = img.mapping.l2_table_offset(0)
    patch(path, l2 + 8, ">Q", (1 << 63) | (1 << 40))       # entry 1 -> far past EOF
    before = file_state(path)[0]
    with qcow2fast.open(path, "r+") as img:
        with pytest.raises(CorruptImageError, match="L2"):
            img.create_snapshot("s")
    assert file_state(path)[0][:72] == before[:72]


def test_rename_and_ids(tmp_path):
    path, size = make(tmp_path, (65536, 16, "1.1", False, False))
    with qcow2fast.open(path, "r+") as img:
        a = img.create_snapshot("a")
        b = img.create_snapshot("b", id="10")
        c = img.create_snapshot("c")
        assert (a.id, b.id, c.id) == ("1", "10", "11")      # qemu: one past the largest
        img.rename_snapshot("a", "z")
        with pytest.raises(InvalidArgumentError):
            img.rename_snapshot("z", "b")
        assert [s.name for s in img.snapshots] == ["z", "b", "c"]
    assert [s["name"] for s in qemu_info(path)["snapshots"]] == ["z", "b", "c"]
    qemu_check(path)


@pytest.mark.parametrize("taken,now", [(4 * MiB, 12 * MiB), (12 * MiB, 4 * MiB)],
                         ids=["smaller", "larger"])
def test_apply_snapshot_of_another_size(tmp_path, taken, now):
    """A snapshot taken at another disk size (qemu-img resize in between,
    growing, or shrinking past the snapshot's data): applying it gives the
    disk that size back with the snapshot's data, as qemu-img snapshot -a
    does on a copy; a write after it copies on write past the old end."""
    path, size = make(tmp_path, (4096, 16, "1.1", False, False), taken)
    with qcow2fast.open(path, "r+") as img:
        img.write(0, b"q" * 70000)
        img.write(taken - 300000, b"b" * 300000)
        img.create_snapshot("snap")
    qemu_img("resize", "--shrink", path, str(now))
    qemu_io(path, f"write -P 3 {now - 4096} 4096")
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(path, ref)
    qemu_img("snapshot", "-a", "snap", ref)
    with qcow2fast.open(path, "r+") as img:
        img.apply_snapshot("snap")
        assert img.size == taken
        assert img.read(taken - 300000, 300000) == b"b" * 300000
        img.write(taken - 4096, b"c" * 4096)
    qemu_check(path)
    assert header(path)["l1_size"] == header(ref)["l1_size"]
    assert qemu_info(path)["virtual-size"] == qemu_info(ref)["virtual-size"] == taken
    expected = bytearray(qemu_raw(ref))
    expected[taken - 4096:] = b"c" * 4096
    assert_bytes_equal(qemu_raw(path), bytes(expected), "after apply")
    assert_bytes_equal(qemu_raw(path, snapshot="snap"), qemu_raw(ref, snapshot="snap"), "snap")


def test_snapshot_limit_as_qemu(tmp_path, capsys):
    """An image holding 65536 snapshots (qemu's QCOW_MAX_SNAPSHOTS; the
    table written through the engine's table writer: empty disks): one more
    is refused by the API and by the command with qemu-img's message and
    status, nothing written; after a delete the 65536th is taken again."""
    from qcow2fast.spec.snapshot import Snapshot
    path = str(tmp_path / "full.qcow2")
    qcow2fast.create(path, MiB)
    with qcow2fast.open(path, "r+") as img:
        img._snapshot_ops()._publish_table(
            [Snapshot(0, 0, str(i + 1), f"s{i}", 0, 0, 0, 0, MiB, b"", None)
             for i in range(65536)])
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(path, ref)
    before = file_state(path)
    q = qemu_img("snapshot", "-c", "x", ref, check=False)
    status, out, err = run_cli(capsys, "snapshot", "-c", "x", path)
    assert status == q.returncode == 1
    assert err.replace("qcow2fast: ", "") == q.stderr_text.replace("qemu-img: ", "")
    with qcow2fast.open(path, "r+") as img:
        with pytest.raises(LimitExceededError):
            img.create_snapshot("x")
    assert file_state(path) == before
    with qcow2fast.open(path, "r+") as img:
        img.delete_snapshot("s7")
        img.create_snapshot("x")
        assert len(img.snapshots) == 65536 and img.snapshots[-1].id == "65537"
    assert header(path)["nb_snapshots"] == 65536
    qemu_check(path)


def test_many_snapshots_and_reopen(tmp_path):
    """Tens of snapshots with writes between them, deleted in a random
    order across reopens; each snapshot keeps its content."""
    path, size = make(tmp_path, (4096, 16, "1.1", False, False), 1 * MiB)
    rng = Rng(3)
    m = Model(path, size)
    with qcow2fast.open(path, "r+") as img:
        for i in range(40):
            off, n = rng.span(size, 9000)
            data = rng.randbytes(n)
            img.write(off, data)
            m.active[off:off + n] = data
            img.create_snapshot(f"s{i}")
            m.snaps[f"s{i}"] = bytes(m.active)
    order = list(m.snaps)
    rng.shuffle(order)
    for k in range(0, len(order), 13):
        with qcow2fast.open(path, "r+") as img:
            for name in order[k:k + 13][:-1]:
                img.delete_snapshot(name)
                del m.snaps[name]
    m.verify()
