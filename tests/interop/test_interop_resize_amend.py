"""Resize and amend against qemu-img 7.2: the same image copied twice,
one copy changed by qcow2fast, the other by qemu-img; afterwards both
are clean for ``qemu-img check``, ``qemu-img compare`` finds the active
disks (and every internal snapshot) equal, and ``info --output=json``
agrees on everything but the file's own size."""

import shutil
import struct

import pytest

import qcow2fast
from qcow2fast.cli.options import cvtnum
from qcow2fast.errors import (InvalidArgumentError, Qcow2Error, ReadOnlyImageError,
                              UnsupportedFeatureError)
from tests.helpers.luks_util import qemu_check_luks, qemu_create_luks, qemu_io_luks
from tests.helpers.qemu_util import (file_state, header, patch, qemu_check, qemu_create, qemu_img,
                                     qemu_info, qemu_io, qemu_map, qemu_raw)

pytestmark = pytest.mark.qemu
MiB = 1 << 20
LUKS_PW = "resize passphrase"

# (cluster_size, refcount_bits, compat, extra create options)
GEOMETRIES = [
    (65536, 16, "1.1", {}),
    (512, 1, "1.1", {}),
    (4096, 64, "1.1", {"lazy_refcounts": "on"}),
    (65536, 16, "0.10", {}),
    (32768, 8, "1.1", {"extended_l2": "on"}),
    (65536, 16, "1.1", {"compression_type": "zstd"}),
]


def geo_id(g):
    cs, rb, compat, extra = g
    return f"cs{cs}-rb{rb}-v{compat}" + "".join(f"-{k}" for k in extra)


def make_image(path, geometry, size=8 * MiB, snapshots=True):
    """An image qemu wrote: data, zero clusters (v3), compressed clusters,
    and (refcounts of 2 bits or more) an internal snapshot taken between
    writes.  Returns the snapshot names."""
    cs, rb, compat, extra = geometry
    qemu_create(path, size, cluster_size=cs, refcount_bits=rb, compat=compat, **extra)
    cmds = ["write -P 1 0 1M", "write -P 2 3M 300k", f"write -c -P 3 {5 * MiB} {4 * cs}",
            f"write -P 4 {size - cs} {cs}"]
    if compat != "0.10":
        cmds += ["write -z 512k 256k", f"write -z -u {6 * MiB} {2 * cs}"]
    qemu_io(path, *cmds)
    names = []
    if snapshots and rb >= 2:
        qemu_img("snapshot", "-c", "s1", path)
        qemu_io(path, "write -P 5 256k 512k", f"write -z {3 * MiB} 64k")
        names.append("s1")
    return names


def assert_same(ours, theirs, snapshots, qemu_clean=True):
    """Both clean, same disk and snapshots, same info (but the file size)."""
    qemu_check(ours)
    qemu_check(theirs, expect_clean=qemu_clean)
    p = qemu_img("compare", ours, theirs, check=False)
    assert p.returncode == 0, p.stdout_text + p.stderr_text
    for name in snapshots:
        assert qemu_raw(ours, snapshot=name) == qemu_raw(theirs, snapshot=name), name
    a, b = qemu_info(ours), qemu_info(theirs)
    for info in (a, b):
        info.pop("actual-size", None)
        info.pop("filename", None)
        for sn in info.get("snapshots", []):
            sn.pop("date-sec", None)        # (kept as they were: compared below)
    assert a == b
    # Snapshot tables untouched (dates included) unless qemu rewrote them.
    assert [s["name"] for s in qemu_info(ours).get("snapshots", [])] == snapshots


def copies(tmp_path, geometry, **kw):
    a, b = tmp_path / "ours.qcow2", tmp_path / "qemu.qcow2"
    names = make_image(a, geometry, **kw)
    shutil.copy(a, b)
    return a, b, names


# -- resize ------------------------------------------------------------------------------

@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geo_id)
def test_resize_like_qemu(tmp_path, geometry):
    # (a v2 image with snapshots is not resized: test_resize_refusals)
    a, b, names = copies(tmp_path, geometry, snapshots=geometry[2] != "0.10")
    steps = [("+40M", False, "off"), ("6M", True, "off"), ("6000k", True, "off"),
             ("+3M", False, "metadata"), ("+1M", False, "full"), ("20M", False, "falloc"),
             ("1M", True, "off"), ("+64M", False, "off")]
    for size, shrink, prealloc in steps:
        args = (["--shrink"] if shrink else []) + [f"--preallocation={prealloc}"]
        qemu_img("resize", "-q", *args, b, size)
        with qcow2fast.open(a, "r+") as img:
            n = cvtnum("size", size.lstrip("+"))
            img.resize(img.size + n if size[0] == "+" else n, shrink=shrink,
                       preallocation=prealloc)
        assert_same(a, b, names)


def test_resize_in_one_session_with_writes(tmp_path):
    """Writes, grow and shrink without reopening: pending L1 entries survive
    the L1 table's move; the data path sees each new size."""
    a, b, _ = copies(tmp_path, GEOMETRIES[0], snapshots=False)
    with qcow2fast.open(a, "r+") as img:
        img.write(7 * MiB, b"y" * 8192)
        img.resize(300 * MiB)
        img.write(299 * MiB, b"z" * 4096)
        assert img.read(299 * MiB, 4) == b"zzzz"
        img.resize(2 * MiB, shrink=True)
        with pytest.raises(InvalidArgumentError):
            img.read(3 * MiB, 1)
        img.resize(10 * MiB)
        assert img.read(7 * MiB, 8192) == bytes(8192)
    qemu_io(b, "write -P 121 7M 8k")
    qemu_img("resize", "-q", b, "300M")
    qemu_io(b, "write -P 122 299M 4k")
    qemu_img("resize", "-q", "--shrink", b, "2M")
    qemu_img("resize", "-q", b, "10M")
    assert_same(a, b, [])


def test_resize_over_longer_backing_file(tmp_path):
    """Growing over a backing file longer than the old disk: the new area
    reads as zeros (v3), a v2 image is refused with nothing written."""
    base = tmp_path / "base.qcow2"
    qemu_create(base, 4 * MiB)
    qemu_io(base, "write -P 7 0 4M")
    for compat in ("1.1", "0.10"):
        a, b = tmp_path / f"a{compat}.qcow2", tmp_path / f"b{compat}.qcow2"
        qemu_create(a, 1000 * 1024, backing=base, compat=compat)
        shutil.copy(a, b)
        before = file_state(a)
        p = qemu_img("resize", b, "3M", check=False)
        with qcow2fast.open(a, "r+") as img:
            if compat == "0.10":
                with pytest.raises(UnsupportedFeatureError, match="Failed to zero out new "
                                                                  "clusters"):
                    img.resize(3 * MiB)
                assert p.returncode == 1 and "Failed to zero out" in p.stderr_text
            else:
                img.resize(3 * MiB)
                assert img.read(1000 * 1024, 2 * MiB) == bytes(2 * MiB)
        if compat == "0.10":
            assert file_state(a) == before
        else:
            assert_same(a, b, [])


@pytest.mark.parametrize("backed", [False, True])
@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_preallocated_grow_covers_the_partial_last_cluster(tmp_path, mode, backed):
    """Growing with preallocation from a size inside a cluster the image
    does not map: that cluster is preallocated too (its head keeps what the
    guest saw: zeros or the backing file's data, as qemu's copy-on-write),
    so the whole new area is this layer's; falloc/full clusters over a
    backing file are zeros of their own (no zero flags, as qemu).  The map
    equals qemu-img's (but metadata without a backing file, where qemu
    writes only the head's blocks: the same data, a different hole)."""
    base = None
    if backed:
        base = qemu_create(tmp_path / "base.qcow2", 4 * MiB)
        qemu_io(base, "write -P 0xab 0 4M")
    old = 2048000                   # guest cluster 31 is partial (64 KiB clusters)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu_create(ours, old, backing=base, backing_fmt="qcow2" if backed else None)
    shutil.copy(ours, theirs)
    with qcow2fast.open(ours, "r+") as img:
        img.resize(old + 80 * 1024, preallocation=mode)
    qemu_img("resize", "-q", f"--preallocation={mode}", theirs, str(old + 80 * 1024))
    assert_same(ours, theirs, [])
    assert qemu_raw(ours)[old - 16000:] == (b"\xab" if backed else b"\0") * 16000 + bytes(80 * 1024)
    mapped = [e for e in qemu_map(ours) if e["start"] + e["length"] > old]
    assert all(e["present"] and e["depth"] == 0 for e in mapped), mapped
    if backed or mode != "metadata":
        assert mapped == [e for e in qemu_map(theirs) if e["start"] + e["length"] > old]


@pytest.mark.parametrize("head", [0, 8])
@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_preallocated_grow_of_an_encrypted_image_reads_zeros(tmp_path, mode, head):
    """A LUKS image grown with preallocation from inside a cluster (mapped
    or not: ``head`` its old bytes): qemu reads the old data and zeros in
    the whole new area (encrypted zeros in its host clusters), and checks
    it clean.  (qemu 7.2's own falloc grow of such an image reads garbage
    there: not the reference here.)"""
    p = tmp_path / "e.qcow2"
    qemu_create_luks(p, 2048000, LUKS_PW)
    qemu_io_luks(p, LUKS_PW, "write -P 9 0 1M", *([f"write -P {head} 2031616 16384"] if head
                                                  else []))
    with qcow2fast.open(p, "r+", key_secret=LUKS_PW) as img:
        img.resize(2048000 + 80 * 1024, preallocation=mode)
    qemu_io_luks(p, LUKS_PW, "read -P 9 0 1M", "read -P 0 1M 983040",
                 f"read -P {head} 2031616 16384", "read -P 0 2048000 81920")
    qemu_check_luks(p, LUKS_PW)


@pytest.mark.parametrize("shrunk_by", ["qcow2fast", "qemu"])
def test_grow_after_an_unaligned_shrink_reads_zeros(tmp_path, shrunk_by):
    """A shrink to a size inside a cluster leaves the old bytes in the rest
    of it (qemu's shrink too); a grow makes the new area read as zeros
    there as well (qemu 7.2 shows the old bytes again), for qemu too."""
    p = qemu_create(tmp_path / "t.qcow2", 16 * MiB)
    qemu_io(p, "write -P 0x11 0 16M")
    small = 8 * MiB + 1536
    if shrunk_by == "qemu":
        qemu_img("resize", "-q", "--shrink", p, str(small))
    else:
        with qcow2fast.open(p, "r+") as img:
            img.resize(small, shrink=True)
    with qcow2fast.open(p, "r+") as img:
        img.resize(16 * MiB)
        assert img.read(small, 64 * 1024) == bytes(64 * 1024)
    qemu_check(p)
    assert qemu_raw(p) == b"\x11" * small + bytes(16 * MiB - small)


def test_shrink_leaks_what_a_bad_dropped_table_maps(tmp_path):
    """A dropped L2 table holding an entry check reports (a reserved bit)
    is not understood: the shrink frees the table itself but leaves the
    clusters it maps allocated (leaks, with a LeakWarning), never frees
    them; what stays in the image reads as before and check -r leaks
    makes it clean."""
    from qcow2fast.errors import LeakWarning
    p = qemu_create(tmp_path / "t.qcow2", MiB, cluster_size=512)
    qemu_io(p, "write -P 0x22 0 1M")
    h = header(p)
    with open(p, "rb") as f:
        f.seek(h["l1_table_offset"] + 8 * 20)          # guest 640 KiB: past the new end
        l2 = struct.unpack(">Q", f.read(8))[0] & ((1 << 56) - 512)
        f.seek(l2)
        entry = struct.unpack(">Q", f.read(8))[0]
    patch(p, l2, ">Q", entry | 0x2)                    # a reserved bit (L2E_STD_RESERVED_MASK)
    with qcow2fast.open(p, "r+") as img, pytest.warns(LeakWarning, match=f"{l2:#x}"):
        img.resize(256 * 1024, shrink=True)
    r = qemu_check(p, expect_clean=False)
    assert r.get("corruptions", 0) == 0 and r["leaks"] == 64   # the 64 clusters it maps
    assert qemu_raw(p) == b"\x22" * (256 * 1024)
    qemu_img("check", "-q", "-r", "leaks", p, check=False)
    qemu_check(p)


def test_resize_refusals(tmp_path):
    """Bad input: a clear error and nothing written."""
    p = tmp_path / "v2snap.qcow2"
    qemu_create(p, MiB, compat="0.10")
    qemu_img("snapshot", "-c", "s", p)
    q = tmp_path / "v3.qcow2"
    qemu_create(q, 4 * MiB)
    qemu_io(q, "write -P 1 0 4M")
    cases = [(p, dict(new_size=2 * MiB), "Can't resize a v2 image which has snapshots"),
             (q, dict(new_size=MiB), "shrink=True"),
             (q, dict(new_size=MiB + 100), "multiple of 512"),
             (q, dict(new_size=MiB, shrink=True, preallocation="full"), "Preallocation"),
             (q, dict(new_size=8 * MiB, preallocation="bogus"), "preallocation mode"),
             (q, dict(new_size=1 << 62), "L1 table")]
    for path, kw, message in cases:
        before = file_state(path)
        with qcow2fast.open(path, "r+") as img:
            with pytest.raises(Qcow2Error, match=message):
                img.resize(kw.pop("new_size"), **kw)
        assert file_state(path) == before, message
    with qcow2fast.open(q) as img:
        with pytest.raises(Qcow2Error, match="read-only"):
            img.resize(8 * MiB)
    assert qemu_img("resize", p, "2M", check=False).returncode == 1


# -- amend -------------------------------------------------------------------------------

AMENDS = [{"refcount_bits": "8"}, {"refcount_bits": "64"}, {"refcount_bits": "1"},
          {"compat": "0.10"}, {"compat": "1.1"}, {"lazy_refcounts": "on"},
          {"lazy_refcounts": "off"}, {"size": "12M"}, {"compat": "0.10", "refcount_bits": "16"}]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geo_id)
def test_amend_like_qemu(tmp_path, geometry):
    """Each amend as qemu does it, or refused as qemu refuses it (the
    message the same, nothing written)."""
    a, b, names = copies(tmp_path, geometry)
    for opts in AMENDS:
        text = ",".join(f"{k}={v}" for k, v in opts.items())
        p = qemu_img("amend", "-o", text, b, check=False)
        before = file_state(a)
        kw = {k: (12 * MiB if k == "size" else v) for k, v in opts.items()}
        try:
            qcow2fast.amend(a, kw)
        except Qcow2Error as e:
            assert p.returncode == 1, (opts, e)
            assert str(e) in p.stderr_text, (opts, str(e), p.stderr_text)
            assert file_state(a) == before, opts
            continue
        assert p.returncode == 0, (opts, p.stderr_text)
        assert_same(a, b, names)


def test_amend_downgrade_expands_zero_clusters(tmp_path):
    """compat=0.10 with zero clusters over a backing file (they become
    allocated clusters of zeros) and without one (unallocated)."""
    base = tmp_path / "base.qcow2"
    qemu_create(base, 4 * MiB)
    qemu_io(base, "write -P 9 0 4M")
    for backed in (True, False):
        a = tmp_path / f"z{backed}.qcow2"
        qemu_create(a, 4 * MiB, backing=base if backed else None)
        qemu_io(a, "write -P 1 0 1M", "write -z 1M 1M", "write -z -u 2M 64k",
                "write -P 2 3M 64k", "write -z 3M 64k")
        qemu_img("snapshot", "-c", "s", a)
        qemu_io(a, "write -z 0 64k")
        b = tmp_path / f"q{backed}.qcow2"
        shutil.copy(a, b)
        disk, snap = qemu_raw(a), qemu_raw(a, snapshot="s")
        qemu_img("amend", "-o", "compat=0.10", b)
        qcow2fast.amend(a, {"compat": "0.10"})
        # The zero cluster at 0 kept the offset of a cluster snapshot s
        # shares.  qemu 7.2 zeroes that cluster in place (s then reads zeros
        # there: its data is lost) and sets COPIED on the entry (refcount 2:
        # its check reports corruptions); qcow2fast gives the entry a zero
        # cluster of its own (or none without a backing file).
        qemu_check(a)
        qemu_check(b, expect_clean=False)
        assert qemu_img("compare", a, b, check=False).returncode == 0
        assert qemu_raw(a) == disk and qemu_raw(a, snapshot="s") == snap
        assert qemu_raw(b, snapshot="s")[:65536] == bytes(65536) != snap[:65536]
        assert qemu_info(a)["format-specific"]["data"]["compat"] == "0.10"


@pytest.mark.parametrize("backed", [False, True])
def test_downgrade_keeps_the_data_a_zero_cluster_shares(tmp_path, backed):
    """Found by the property test (a stale example): a zero write that
    keeps the offset of a cluster a snapshot shares, then that snapshot
    applied.  Expanding the zero cluster in place (qemu 7.2's amend
    compat=0.10 does) wiped the active disk's byte at 22687; the entry
    now gets its own zero cluster and the shared one keeps its data."""
    base = tmp_path / "base.qcow2"
    qemu_create(base, 24064, cluster_size=4096)
    a = tmp_path / "a.qcow2"
    qemu_create(a, 24064, cluster_size=4096, backing=base if backed else None)
    qemu_io(a, "write -q -P 0x60 22687 1")
    qemu_img("snapshot", "-c", "s7", a)
    qemu_io(a, "write -q -z 20480 3584")        # ZERO with the shared cluster's offset
    qemu_img("snapshot", "-c", "s8", a)
    qemu_img("snapshot", "-a", "s7", a)
    want = {name: qemu_raw(a, snapshot=name) for name in ("s7", "s8")}
    disk = qemu_raw(a)
    assert disk[22687] == 0x60 and want["s8"][20480:] == bytes(24064 - 20480)
    qcow2fast.amend(a, {"compat": "0.10"})
    qemu_check(a)
    assert qemu_raw(a) == disk
    for name, content in want.items():
        assert qemu_raw(a, snapshot=name) == content, name
    with qcow2fast.open(a, "r+") as img:
        img.delete_snapshot("s8")
        assert img.read(22687, 1) == b"\x60"
    qemu_check(a)
    qemu_io(a, "read -P 0x60 22687 1")


def test_amend_refusals(tmp_path):
    a = tmp_path / "a.qcow2"
    qemu_create(a, MiB)
    for opts, message in [({"cluster_size": "4k"}, "Invalid parameter 'cluster_size'"),
                          ({"compression_type": "zstd"}, "Invalid parameter"),
                          ({"foo": "1"}, "Invalid parameter 'foo'"),
                          ({"encrypt.new-secret": "x"}, "encryption not present"),
                          ({"refcount_bits": "3"}, "power of two"),
                          ({"compat": "2"}, "Unknown compatibility level 2"),
                          ({"backing_file": "x"}, "Cannot amend the backing file"),
                          ({"compat": "0.10", "lazy_refcounts": "on"}, "Lazy refcounts"),
                          ({"compat": "0.10", "refcount_bits": "8"}, "Refcount widths"),
                          ({}, "Must specify options")]:
        before = file_state(a)
        with pytest.raises(InvalidArgumentError, match=message):
            qcow2fast.amend(a, opts)
        assert file_state(a) == before


def test_amend_refcount_width_grows_old_table(tmp_path):
    """Widening the refcounts of a full 512-byte-cluster image needs four
    times the blocks: allocating them grows the old refcount table on the
    way, and the switch must free that grown table too (no leak)."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_create(a, 16 * MiB, cluster_size=512)
    qemu_io(a, "write -P 6 0 15900k")       # the old table (2 clusters) is then nearly full
    shutil.copy(a, b)
    qemu_img("amend", "-o", "refcount_bits=64", b)
    qcow2fast.amend(a, {"refcount_bits": 64})
    assert_same(a, b, [])


def test_corrupt_image_is_neither_resized_nor_amended(tmp_path):
    """An image marked corrupt opens read-only: resize and amend refuse it
    (saying why) and write nothing."""
    a = tmp_path / "c.qcow2"
    qemu_create(a, MiB)
    h = header(a)
    patch(a, 72, ">Q", h["incompatible_features"] | 2)      # the corrupt bit
    before = file_state(a)
    with pytest.raises(ReadOnlyImageError, match="corrupt"):
        qcow2fast.amend(a, {"lazy_refcounts": "on"})
    with qcow2fast.open(a, "r+") as img:
        with pytest.raises(ReadOnlyImageError, match="corrupt"):
            img.resize(2 * MiB)
    assert file_state(a) == before


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("preallocation", ["off", "metadata"])
def test_growing_over_the_vm_state_an_apply_left_reads_zeros(tmp_path, compat, preallocation):
    """After a snapshot with VM state is applied and deleted, the active L1
    table still maps that VM state past the disk's end (qemu's goto copies
    the snapshot's whole L1).  Growing over it gives the guest zeros, not
    the saved VM state (qemu 7.2 shows it; its metadata preallocation then
    leaves a corrupt image), and leaks nothing (a metadata preallocation
    leaked the cluster it replaced)."""
    path = tmp_path / "img.qcow2"
    qcow2fast.create(path, 33280, cluster_size=512, compat=compat)
    with qcow2fast.open(path, "r+") as img:
        img.write(0, b"\x11" * 512)
        img.create_snapshot("s", vm_state=b"v" * 789)
        img.apply_snapshot("s")
    qemu_img("snapshot", "-d", "s", str(path))
    with qcow2fast.open(path, "r+") as img:
        img.resize(66048, preallocation=preallocation)
    qemu_check(path)
    got = qemu_raw(path)
    assert got == b"\x11" * 512 + bytes(66048 - 512)
