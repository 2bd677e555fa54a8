"""Damaged snapshot tables and snapshot L1 tables, against qemu-img 7.2:
what check reports and check -r all repairs (as qemu's
qcow2_check_read_snapshot_table), a snapshot whose L1 table is unaligned
or too large (refused where used, as qemu), or past the end of the file
(read as zeros, as qemu)."""

import shutil

import pytest

import qcow2fast
from qcow2fast.errors import InvalidArgumentError
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import (assert_bytes_equal, file_state, header, patch, qemu_check,
                                     qemu_create, qemu_img, qemu_io, qemu_raw, run_python)

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def _mangled_table(tmp_path, case):
    """An image whose snapshot table qemu refuses to open (extra data past
    its limit) or reports (a v3 entry with 8 bytes of extra data)."""
    import struct
    from qcow2fast.spec.snapshot import pack_table
    path = str(tmp_path / f"{case}.qcow2")
    qcow2fast.create(path, 4 * MiB)
    with qcow2fast.open(path, "r+") as img:
        img.write(0, b"x" * 70000)
        img.create_snapshot("a")
        img.write(0, b"y" * 100)
        img.create_snapshot("b")
        snaps, off, size = list(img.snapshots), img.header.snapshots_offset, img.size
    if case == "extra":
        snaps[0].extra_data = bytes(2000)
        table = pack_table(snaps, size)
    else:
        t = pack_table(snaps, size)
        end0 = 40 + 24 + len(snaps[0].id) + len(snaps[0].name)
        entry0 = bytearray(t[:48] + t[64:end0])
        entry0[36:40] = struct.pack(">I", 8)
        table = bytes(entry0) + bytes(-len(entry0) % 8) + t[-(-end0 // 8) * 8:] + bytes(64)
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(table)
    return path


@pytest.mark.parametrize("case", ["extra", "incomplete"])
def test_check_repairs_snapshot_table_as_qemu(tmp_path, capsys, case):
    """check and check -r all: qemu's statuses, and after -r all qemu's
    messages and the same table as qemu's repair leaves."""
    path = _mangled_table(tmp_path, case)
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(path, ref)
    q = qemu_img("check", ref, check=False)
    status, _, err = run_cli(capsys, "check", path)
    assert status == q.returncode != 0
    assert err.replace("qcow2fast: ", "") == q.stderr_text.replace("qemu-img: ", "")
    q = qemu_img("check", "-r", "all", ref, check=False)
    status, out, err = run_cli(capsys, "check", "-r", "all", path)
    assert status == q.returncode == 0
    assert err.replace("qcow2fast: ", "") == q.stderr_text.replace("qemu-img: ", "")
    assert out == q.stdout_text
    qemu_check(path)
    assert qemu_img("snapshot", "-l", path).stdout_text == qemu_img("snapshot", "-l", ref).stdout_text
    assert_bytes_equal(qemu_raw(path, snapshot="a"), qemu_raw(ref, snapshot="a"), "snapshot a")


def test_check_reports_too_many_snapshots_as_qemu(tmp_path, capsys):
    """More than 65536 snapshots: qemu's check gives up with its message
    (check -r all drops the overhanging ones; too slow a case for the
    suite, checked by hand)."""
    path = _mangled_table(tmp_path, "extra")
    patch(path, 60, ">I", 70000)
    q = qemu_img("check", path, check=False)
    status, out, err = run_cli(capsys, "check", path)
    assert status == q.returncode == 1
    assert err.replace("qcow2fast: ", "") == q.stderr_text.replace("qemu-img: ", "")


def _bad_l1_snapshot(tmp_path, l1_offset, l1_size):
    """An image with snapshots "bad" (its L1 table moved to ``l1_offset``
    or resized to ``l1_size`` in the table) and "good", data written
    between them."""
    import struct
    path = str(tmp_path / "a.qcow2")
    qemu_create(path, 4 * MiB)
    qemu_io(path, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "bad", path)
    qemu_img("snapshot", "-c", "good", path)
    off = header(path)["snapshots_offset"]
    with open(path, "r+b") as f:
        f.seek(off)
        fixed = bytearray(f.read(12))
        if l1_offset is not None:
            fixed[0:8] = struct.pack(">Q", l1_offset)
        if l1_size is not None:
            fixed[8:12] = struct.pack(">I", l1_size)
        f.seek(off)
        f.write(fixed)
    return path


@pytest.mark.parametrize("l1_offset,l1_size", [(0x12345, None), (None, 1 << 30)])
def test_snapshot_with_a_bad_l1_table_is_refused_only_when_used(tmp_path, capsys, l1_offset,
                                                                l1_size):
    """A snapshot whose L1 table is unaligned or too large: the image opens
    for writing (as in qemu) and the other snapshots work; applying,
    deleting or viewing that one is refused with nothing written, as qemu
    refuses it; check reports it as qemu's check does."""
    path = _bad_l1_snapshot(tmp_path, l1_offset, l1_size)
    ours, pristine = str(tmp_path / "ours.qcow2"), str(tmp_path / "pristine.qcow2")
    shutil.copy(path, ours)
    shutil.copy(path, pristine)
    q = qemu_img("check", path, check=False)
    status, out, err = run_cli(capsys, "check", pristine)
    assert status == q.returncode
    theirs = [ln for ln in q.stderr_text.splitlines() if ln.startswith("ERROR")]
    assert theirs and [ln for ln in err.splitlines() if ln.startswith("ERROR")] == theirs
    if l1_size is None:     # (qemu's overlap check then fails every write: a huge table)
        qemu_io(path, "write -P 2 0 4k")
    with qcow2fast.open(ours, "r+") as img:
        img.write(0, b"\x02" * 4096)
        img.flush()
        before = file_state(ours)
        for op in (img.apply_snapshot, img.delete_snapshot):
            with pytest.raises(InvalidArgumentError, match="Snapshot L1 table"):
                op("bad")
        assert file_state(ours) == before and not img.corrupt
        img.apply_snapshot("good")
    with pytest.raises(InvalidArgumentError, match="Snapshot L1 table"):
        qcow2fast.open(ours, snapshot="bad")
    assert qemu_raw(ours) == qemu_raw(path, snapshot="good")
    for which in (path, ours):
        before = file_state(which)
        assert qemu_img("snapshot", "-d", "bad", which, check=False).returncode == 1
        assert run_cli(capsys, "snapshot", "-d", "bad", which)[0] == 1
        assert file_state(which) == before
    # A downgrade (qemu-iotests 080) is refused before anything is written, in
    # bounded memory: it read the 8 GiB table the size names (4 GiB resident)
    # and left the image dirty.
    before = file_state(ours)
    p = run_python(f"from qcow2fast import amend\namend({ours!r}, {{'compat': '0.10'}})",
                   check=False, mem_limit=1 << 30)
    assert p.returncode == 1 and "Snapshot L1 table" in p.stderr_text, p.stderr_text[-2000:]
    assert file_state(ours) == before


@pytest.mark.parametrize("op", ["delete", "apply"])
def test_snapshot_l1_table_past_eof_reads_as_zeros_as_qemu(tmp_path, capsys, op):
    """A snapshot whose L1 table lies past the end of the file: qemu reads
    the table as zeros (its file driver pads reads past the end), so it
    views the snapshot as an empty disk, applies it (the disk reads zeros)
    and deletes it (nothing to lower; freeing the table's clusters fails
    and is rolled back: leaks).  qcow2fast does the same: same snapshot
    list, same content, same check result (leaks only) as qemu's on a copy."""
    path = _bad_l1_snapshot(tmp_path, 1 << 40, None)
    ours, again = str(tmp_path / "ours.qcow2"), str(tmp_path / "again.qcow2")
    shutil.copy(path, ours)
    shutil.copy(path, again)
    with qcow2fast.open(ours, snapshot="bad") as view:
        assert view.read(0, view.size) == qemu_raw(path, snapshot="bad") == bytes(view.size)
    flag = {"delete": "-d", "apply": "-a"}[op]
    q = qemu_img("snapshot", flag, "bad", path, check=False)
    assert q.returncode == 0
    status, out, err = run_cli(capsys, "snapshot", flag, "bad", ours)
    assert status == 0, err
    # (delete: qemu's failed free of the table, printed bare, status 0)
    assert err == q.stderr_text and (op == "apply") != bool(err)
    if op == "delete":      # the library says it as a LeakWarning
        with qcow2fast.open(again, "r+") as img, \
                pytest.warns(qcow2fast.LeakWarning, match="past the end of the file"):
            img.delete_snapshot("bad")
    assert qemu_img("snapshot", "-l", ours).stdout_text == \
        qemu_img("snapshot", "-l", path).stdout_text
    assert qemu_raw(ours) == qemu_raw(path)
    assert qemu_raw(ours, snapshot="good") == qemu_raw(path, snapshot="good")
    # (where the new snapshot table goes is the allocator's choice)
    theirs, mine = ({k: v for k, v in qemu_check(p, expect_clean=False).items()
                     if k not in ("filename", "image-end-offset")} for p in (path, ours))
    assert mine == theirs and mine.get("leaks"), (mine, theirs)
    # (after apply the bad snapshot is still there: check reports its table)
    assert bool(mine.get("corruptions")) == (op == "apply")


def _last_entry(path):
    """Offset of the snapshot table's last entry (entries are 8-byte aligned)."""
    import struct
    h = header(path)
    pos = h["snapshots_offset"]
    with open(path, "rb") as f:
        for _ in range(h["nb_snapshots"] - 1):
            f.seek(pos)
            _, _, id_len, name_len, *_, extra_len = struct.unpack(">QIHHIIQII", f.read(40))
            pos += 40 + extra_len + id_len + name_len
            pos += -pos % 8
    return pos


def test_open_refusal_is_qemus_message(tmp_path, capsys):
    """Too much extra data in an entry: the command line prints qemu's two
    lines; the exception names the field and its offset."""
    path = _mangled_table(tmp_path, "extra")
    q = qemu_img("info", path, check=False)
    status, out, err = run_cli(capsys, "info", path)
    assert status == q.returncode == 1
    assert err.replace("qcow2fast: ", "") == q.stderr_text.replace("qemu-img: ", "")
    with pytest.raises(qcow2fast.CorruptImageError) as e:
        qcow2fast.open(path)
    assert e.value.field == "extra_data_size" and e.value.offset == header(path)["snapshots_offset"] + 36


def test_snapshot_names_end_at_a_nul_as_qemu(tmp_path, capsys):
    """An id or name with a NUL byte: qemu holds it as a C string, so the
    listing shows what comes before the NUL; so does qcow2fast's."""
    path = str(tmp_path / "a.qcow2")
    qemu_create(path, 4 * MiB)
    qemu_img("snapshot", "-c", "abcdef", path)
    qemu_img("snapshot", "-c", "second", path)
    import struct
    entry = _last_entry(path)
    with open(path, "rb") as f:
        f.seek(entry)
        _, _, id_len, _, *_, extra_len = struct.unpack(">QIHHIIQII", f.read(40))
    patch(path, entry + 40 + extra_len + id_len + 2, ">B", 0)      # "second" -> "se\0ond"
    q = qemu_img("snapshot", "-l", path)
    status, out, err = run_cli(capsys, "snapshot", "-l", path)
    assert status == 0 and out == q.stdout_text and "se " in out


def test_table_running_past_eof_is_read_and_repaired_as_qemu(tmp_path, capsys):
    """The last entry's extra data made 64 KiB, so the entry runs past the
    end of the file (iotest 261's case): qemu reads past the end as zeros,
    refuses to open it (too much extra data), and check -r all cuts the
    extra data, rebuilds the refcounts (the table's last cluster past the
    end has refcount 0) and writes the table anew.  qcow2fast: the same
    messages, statuses and result."""
    path = str(tmp_path / "a.qcow2")
    qemu_create(path, 4 * MiB)
    qemu_io(path, "write -P 1 0 64k")
    for name in ("one", "two", "three"):
        qemu_img("snapshot", "-c", name, path)
    patch(path, _last_entry(path) + 36, ">I", 1 << 16)
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(path, ref)
    for args in (["check"], ["check", "-r", "all"]):
        q = qemu_img(*args, ref, check=False)
        status, out, err = run_cli(capsys, *args, path)
        assert status == q.returncode, err
        assert err.replace("qcow2fast: ", "") == q.stderr_text.replace("qemu-img: ", "")
        # (where the rebuilt refcount structures go is the allocator's choice)
        assert [ln for ln in out.splitlines() if not ln.startswith("Image end offset")] == \
            [ln for ln in q.stdout_text.splitlines() if not ln.startswith("Image end offset")]
    qemu_check(path)
    assert qemu_img("snapshot", "-l", path).stdout_text == qemu_img("snapshot", "-l", ref).stdout_text
    assert_bytes_equal(qemu_raw(path, snapshot="one"), qemu_raw(ref, snapshot="one"), "snapshot one")
