"""``qcow2fast check`` against ``qemu-img check`` 7.2: same JSON, same
counts, same exit statuses, and repairs that leave qemu-img check clean
without changing guest data."""

import json
import os
import shutil

import pytest

from qcow2fast.cli import main
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import (QCOW_OFLAG_COPIED, file_state, header, l2_entry_offset, patch,
                                     qemu_check, qemu_create, qemu_img, qemu_io, qemu_map, qemu_raw,
                                     read_at, run_python)

pytestmark = pytest.mark.qemu
KiB, MiB = 1024, 1 << 20


DETAIL = "    host offset "      # qcow2fast's line under a leak/corruption: who references it


def cli(capsys, *argv):
    """Run qcow2fast in-process: (status, stdout, stderr without the detail
    lines, which qemu does not print; test_references checks them)."""
    status, out, err = run_cli(capsys, *argv)
    return status, out, "".join(line for line in err.splitlines(keepends=True)
                                if not line.startswith(DETAIL))


def qemu_json_check(path, *extra):
    p = qemu_img("check", "--output=json", *extra, path, check=False)
    return p.returncode, (json.loads(p.stdout_text) if p.stdout_text.strip() else None), \
        p.stderr_text


def assert_same_as_qemu(capsys, path):
    """check --output=json equals qemu-img's, exit status too; returns the JSON."""
    before = file_state(path)
    status, out, err = cli(capsys, "check", "--output=json", path)
    assert file_state(path) == before, "check without -r wrote to the image"
    q_status, q_json, q_err = qemu_json_check(path)
    assert status == q_status, (err, q_err)
    assert json.loads(out) == q_json, (err, q_err)
    q_err = q_err.replace("qemu-img: ", "qcow2fast: ")      # the program's name
    assert sorted(err.splitlines()) == sorted(q_err.splitlines())
    return q_json


# -- images made by qemu -----------------------------------------------------------------

def _fill(path, cs):
    qemu_io(path, "write -P 1 0 100k", f"write -P 2 {3 * cs} {2 * cs}",
            "write -P 3 1M 64k", f"write -z {5 * cs} {cs}", "write -P 4 300k 8k")


@pytest.mark.parametrize("cs,rb,compat", [(512, 16, "1.1"), (65536, 1, "1.1"),
                                          (2 * MiB, 64, "1.1"), (65536, 16, "0.10"),
                                          (4096, 16, "1.1")])
def test_matrix_equals_qemu(capsys, tmp_path, cs, rb, compat):
    p = qemu_create(tmp_path / "a.qcow2", max(8 * MiB, 16 * cs), cluster_size=cs, refcount_bits=rb,
                    compat=compat)
    _fill(p, cs)
    j = assert_same_as_qemu(capsys, p)
    assert j["allocated-clusters"] > 0


def test_fragmented_and_compressed(capsys, tmp_path):
    p = qemu_create(tmp_path / "f.qcow2", 4 * MiB, cluster_size=512)
    qemu_io(p, "write -P 1 0 512", "write -P 2 32k 512", "write -P 3 512 512",
            "write -P 4 64k 1k", "write -c -P 5 100k 512", "write -c -P 5 101k 512",
            "write -P 6 33k 2k", "write -P 7 1k 512")
    j = assert_same_as_qemu(capsys, p)
    assert j["fragmented-clusters"] and j["compressed-clusters"] == 2


def test_empty_and_zero_clusters(capsys, tmp_path):
    p = qemu_create(tmp_path / "e.qcow2", 4 * MiB)
    assert_same_as_qemu(capsys, p)
    qemu_io(p, "write -z 0 1M", "write -P 1 2M 64k", "write -z 2M 64k")
    assert_same_as_qemu(capsys, p)


def test_backing_top_and_snapshots(capsys, tmp_path):
    base = qemu_create(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 1 0 2M")
    top = qemu_create(tmp_path / "top.qcow2", None, backing=base)
    qemu_io(top, "write -P 2 64k 128k")
    assert_same_as_qemu(capsys, top)
    qemu_img("snapshot", "-c", "s1", base)
    qemu_io(base, "write -P 3 0 256k")
    qemu_img("snapshot", "-c", "s2", base)
    qemu_io(base, "write -P 4 128k 64k")
    assert_same_as_qemu(capsys, base)


def test_dirty_lazy_refcounts(capsys, tmp_path):
    p = str(tmp_path / "lazy.qcow2")
    run_python(f"""
import os, qcow2fast
qcow2fast.create({p!r}, 4 << 20, lazy_refcounts=True)
img = qcow2fast.open({p!r}, "r+")
img.write(0, b"x" * 200000)
img.write(3 << 20, b"y" * 70000)
img.flush()
os._exit(0)
""")
    assert header(p)["incompatible_features"] & 1
    j = assert_same_as_qemu(capsys, p)
    assert j.get("corruptions") or j.get("leaks")
    before = qemu_raw(p)
    status, out, err = cli(capsys, "check", "-r", "all", p)
    assert status == 0, err
    qemu_check(p)
    assert qemu_raw(p) == before


# -- injected damage ---------------------------------------------------------------------

def _refblock(path):
    h = header(path)
    (rb,) = read_at(path, h["refcount_table_offset"], ">Q")
    return rb


def _damaged(tmp_path, name="d.qcow2"):
    p = qemu_create(tmp_path / name, 8 * MiB)
    qemu_io(p, "write -P 1 0 1M", "write -P 2 3M 64k")
    return p


def _host_cluster(path, guest):
    (e,) = read_at(path, l2_entry_offset(path, guest), ">Q")
    return (e & 0x00FFFFFFFFFFFE00) >> 16


def _set_refcount(path, cluster, value):
    patch(path, _refblock(path) + 2 * cluster, ">H", value)


@pytest.mark.parametrize("damage", ["leak", "low", "zero", "copied_clear", "copied_set",
                                    "l1_copied", "free_leak"])
def test_damage_agrees_with_qemu(capsys, tmp_path, damage):
    p = _damaged(tmp_path)
    c = _host_cluster(p, 0)
    if damage == "leak":
        _set_refcount(p, c, 3)
    elif damage == "low":
        _set_refcount(p, c, 3)          # refcount too low relative to 4 references below
        e = l2_entry_offset(p, 0)
        (v,) = read_at(p, e, ">Q")
        for k in (1, 2, 3):             # four L2 entries share the cluster
            patch(p, e + 8 * k, ">Q", v & ~QCOW_OFLAG_COPIED)
        patch(p, e, ">Q", v & ~QCOW_OFLAG_COPIED)
    elif damage == "zero":
        _set_refcount(p, c, 0)
    elif damage == "copied_clear":
        e = l2_entry_offset(p, 64 * KiB)
        (v,) = read_at(p, e, ">Q")
        patch(p, e, ">Q", v & ~QCOW_OFLAG_COPIED)
    elif damage == "copied_set":
        qemu_io(p, "write -z 5M 64k")   # zero cluster: COPIED must stay clear, then set it
        e = l2_entry_offset(p, 3 * MiB)
        (v,) = read_at(p, e, ">Q")
        _set_refcount(p, _host_cluster(p, 3 * MiB), 2)
    elif damage == "l1_copied":
        h = header(p)
        (v,) = read_at(p, h["l1_table_offset"], ">Q")
        patch(p, h["l1_table_offset"], ">Q", v & ~QCOW_OFLAG_COPIED)
    elif damage == "free_leak":
        c3 = _host_cluster(p, 3 * MiB)
        qemu_io(p, "discard 3M 64k")    # a free cluster below EOF ...
        _set_refcount(p, c3, 1)         # ... marked used
    j = assert_same_as_qemu(capsys, p)
    assert j.get("corruptions") or j.get("leaks")


@pytest.mark.parametrize("mode,damage", [("leaks", "leak"), ("all", "leak"),
                                         ("all", "copied"), ("all", "low"),
                                         ("all", "zero"), ("leaks", "zero"),
                                         ("all", "prealloc"), ("leaks", "prealloc")])
def test_repair(capsys, tmp_path, mode, damage):
    p = _damaged(tmp_path)
    c = _host_cluster(p, 0)
    before = qemu_raw(p)                # the damage below leaves guest data alone
    if damage == "leak":
        _set_refcount(p, c, 2)
        e = l2_entry_offset(p, 0)
        (v,) = read_at(p, e, ">Q")
        patch(p, e, ">Q", v & ~QCOW_OFLAG_COPIED)      # leak only: refcount 2, no COPIED
    elif damage == "copied":
        e = l2_entry_offset(p, 64 * KiB)
        (v,) = read_at(p, e, ">Q")
        patch(p, e, ">Q", v & ~QCOW_OFLAG_COPIED)
    elif damage == "low":
        e = l2_entry_offset(p, 0)
        (v,) = read_at(p, e, ">Q")
        patch(p, e + 8, ">Q", v & ~QCOW_OFLAG_COPIED)  # cluster shared by guest 0 and 64k
        patch(p, e, ">Q", v & ~QCOW_OFLAG_COPIED)
    elif damage == "zero":
        _set_refcount(p, c, 0)
    elif damage == "prealloc":          # a preallocated zero cluster, its offset misaligned
        qemu_io(p, "write -z 3M 64k")
        e = l2_entry_offset(p, 3 * MiB)
        (v,) = read_at(p, e, ">Q")
        assert v & 1 and v & 0x00FFFFFFFFFFFE00
        before = qemu_raw(p)            # qemu cannot read the damaged image
        patch(p, e, ">Q", v + 512)
    q = str(tmp_path / "q.qcow2")
    shutil.copy(p, q)
    q_status, q_json, q_err = qemu_json_check(q, "-r", mode)
    status, out, err = cli(capsys, "check", "-r", mode, "--output=json", p)
    assert status == q_status, (out, err, q_err)
    if status == 1:                     # qemu could not repair either
        assert not out and q_json is None
        return
    got = json.loads(out)
    for key in ("leaks-fixed", "corruptions-fixed", "leaks", "corruptions", "check-errors"):
        assert got.get(key) == q_json.get(key), (key, err, q_err)
    if mode == "all":
        qemu_check(p)
    else:
        r = qemu_check(p, expect_clean=False)
        assert not r.get("leaks")
    assert qemu_raw(p) == before


def test_repair_human(capsys, tmp_path):
    p = _damaged(tmp_path)
    e = l2_entry_offset(p, 64 * KiB)
    (v,) = read_at(p, e, ">Q")
    patch(p, e, ">Q", v & ~QCOW_OFLAG_COPIED)
    q = str(tmp_path / "q.qcow2")
    shutil.copy(p, q)
    status, out, err = cli(capsys, "check", "-r", "all", p)
    qp = qemu_img("check", "-r", "all", q, check=False)
    assert status == qp.returncode == 0
    assert out == qp.stdout_text
    assert err == qp.stderr_text


def test_repair_json_counts_leaks(capsys, tmp_path):
    p = _damaged(tmp_path)
    c = _host_cluster(p, 3 * MiB)
    e = l2_entry_offset(p, 3 * MiB)
    (v,) = read_at(p, e, ">Q")
    patch(p, e, ">Q", v & ~QCOW_OFLAG_COPIED)
    _set_refcount(p, c, 2)
    _set_refcount(p, 15, 1)
    q = str(tmp_path / "q.qcow2")
    shutil.copy(p, q)
    status, out, err = cli(capsys, "check", "-r", "leaks", "--output=json", p)
    q_status, q_json, _ = qemu_json_check(q, "-r", "leaks")
    assert status == q_status == 0
    got = json.loads(out)
    got["filename"] = q_json["filename"]
    assert got == q_json


def test_human_output(capsys, tmp_path):
    p = _damaged(tmp_path)
    _set_refcount(p, _host_cluster(p, 0), 2)
    status, out, err = cli(capsys, "check", p)
    q = qemu_img("check", p, check=False)
    assert status == q.returncode == 2
    assert out == q.stdout_text
    status, out, _ = cli(capsys, "check", "-q", p)
    assert status == 2 and out == ""
    status, out, _ = cli(capsys, "check", "-q", "--output=json", p)
    assert status == 2 and out == "" == qemu_img("check", "-q", "--output=json", p,
                                                 check=False).stdout_text


def test_clean_human_output(capsys, tmp_path):
    p = _damaged(tmp_path)
    status, out, _ = cli(capsys, "check", p)
    assert status == 0
    assert out == qemu_img("check", p).stdout_text
    assert out.startswith("No errors were found on the image.")
    status, out2, _ = cli(capsys, "check", "-U", "--image-opts",
                          f"driver=qcow2,file.filename={p}")
    assert status == 0 and out2 == out


def test_malformed_entries(capsys, tmp_path):
    p = qemu_create(tmp_path / "m.qcow2", 1 * MiB, cluster_size=512)
    qemu_io(p, "write -P 1 0 1k", "write -P 4 64k 1k", "write -c -P 5 100k 512")
    e = l2_entry_offset(p, 64 * KiB)
    (v,) = read_at(p, e, ">Q")
    patch(p, e, ">Q", (v & QCOW_OFLAG_COPIED) | (1 << 40))      # past EOF
    e = l2_entry_offset(p, 100 * KiB)
    (v,) = read_at(p, e, ">Q")
    patch(p, e, ">Q", v | QCOW_OFLAG_COPIED)                    # COPIED on compressed
    e = l2_entry_offset(p, 512)
    (v,) = read_at(p, e, ">Q")
    patch(p, e, ">Q", v | 2)                                     # reserved bit
    e = l2_entry_offset(p, 65 * KiB)
    (v,) = read_at(p, e, ">Q")
    patch(p, e, ">Q", v + 256)                                   # unaligned
    assert_same_as_qemu(capsys, p)
    q = str(tmp_path / "q.qcow2")
    shutil.copy(p, q)
    status, out, err = cli(capsys, "check", "-r", "all", "--output=json", p)
    q_status, q_json, q_err = qemu_json_check(q, "-r", "all")
    # what can be repaired is; the malformed entries stay (qemu leaves them too).
    # One deliberate difference: the entry past EOF becomes a zero cluster
    # (fsck/past_eof.py), where qemu 7.2 leaves it.
    assert status == q_status == 2, (err, q_err)
    got = json.loads(out)
    # (qemu counts it among what its refcount rebuild fixed: the same count)
    for key in ("leaks-fixed", "corruptions-fixed", "leaks", "check-errors"):
        assert got.get(key) == q_json.get(key), (key, err, q_err)
    assert got["corruptions"] == q_json["corruptions"] - 1, (err, q_err)
    assert "Repairing offset=10000000000: Data cluster lies past the end of the file" in err
    assert "exceeding the end of the file" not in cli(capsys, "check", p)[2]
    assert qemu_raw(p)[64 * KiB:64 * KiB + 512] == bytes(512)     # it reads as before


def test_raw_is_63(capsys, tmp_path):
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\0" * MiB)
    status, _, err = cli(capsys, "check", raw)
    assert status == 63 == qemu_img("check", raw, check=False).returncode
    assert "does not support checks" in err


def test_usage_errors(capsys, tmp_path):
    status, _, err = cli(capsys, "check", "-r", "bogus", tmp_path / "x")
    assert status == 1 and err.startswith("qcow2fast: ")
    status, _, err = cli(capsys, "check", tmp_path / "missing.qcow2")
    assert status == 1 and "missing.qcow2" in err


def test_bad_header_reports(capsys, tmp_path):
    p = _damaged(tmp_path)
    patch(p, 48, ">Q", 123)                 # refcount table offset unaligned
    status, _, err = cli(capsys, "check", p)
    assert status == qemu_img("check", p, check=False).returncode == 1
    assert err.startswith("qcow2fast: ") and len(err.splitlines()) == 1


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_marked_corrupt_is_cleared_by_repair(capsys, tmp_path, mode):
    p = _damaged(tmp_path)
    _set_refcount(p, _host_cluster(p, 0), 2)
    patch(p, 72, ">Q", 2)                   # the corrupt bit
    q = str(tmp_path / "q.qcow2")
    shutil.copy(p, q)
    assert_same_as_qemu(capsys, p)
    before = qemu_raw(p)
    status, _, err = cli(capsys, "check", "-r", mode, p)
    q_status = qemu_img("check", "-r", mode, q, check=False).returncode
    assert status == q_status, err
    assert header(p)["incompatible_features"] == header(q)["incompatible_features"]
    assert qemu_raw(p) == before


def test_dirty_repair_leaks(capsys, tmp_path):
    p = str(tmp_path / "lazy.qcow2")
    run_python(f"""
import os, qcow2fast
qcow2fast.create({p!r}, 4 << 20, lazy_refcounts=True, cluster_size=4096)
img = qcow2fast.open({p!r}, "r+")
img.write(0, b"x" * 100000)
img.flush()
os._exit(0)
""")
    q = str(tmp_path / "q.qcow2")
    shutil.copy(p, q)
    state = file_state(p)
    status, _, err = cli(capsys, "check", "-r", "leaks", p)
    q = qemu_img("check", "-r", "leaks", q, check=False)
    # refcounts of 0 need a rebuild, which -r leaks does not do: both give up
    assert status == q.returncode == 1
    assert err.splitlines()[:-1] == q.stderr_text.splitlines()[:-1]
    assert file_state(p) == state


def test_references_named_under_each_report(capsys, tmp_path):
    """With --explain, under each leak and corruption, check says which
    structure points at the cluster: an L2 entry with its guest offset,
    compressed data, the header, the L1 table -- or nothing.  Without it,
    check prints exactly qemu-img's lines."""
    p = qemu_create(tmp_path / "r.qcow2", 4 * MiB)
    qemu_io(p, "write -c -P 1 0 64k", "write -P 2 1M 64k")
    h = header(p)
    data_host = [q["offset"] for q in qemu_map(p) if q.get("offset")][0]
    cs = 65536
    rb = read_at(p, h["refcount_table_offset"], ">Q")[0]
    (entry,) = read_at(p, l2_entry_offset(p, 0), ">Q")         # guest cluster 0: compressed
    comp_cluster = (entry & ((1 << 54) - 1)) // cs              # 64 KiB clusters: x = 54
    for cluster, value in ((0, 2), (h["l1_table_offset"] // cs, 2), (data_host // cs, 0),
                           (comp_cluster, 2)):
        patch(p, rb + 2 * cluster, ">H", value)
    main(["check", p])
    plain = capsys.readouterr().err
    q = qemu_img("check", p, check=False)
    assert plain.replace("qcow2fast: ", "qemu-img: ") == q.stderr_text     # qemu's lines only
    main(["check", "--explain", p])
    err = capsys.readouterr().err.splitlines()
    detail = {err[i - 1].split()[2]: line               # "... cluster N refcount=..."
              for i, line in enumerate(err) if line.startswith(DETAIL)}
    assert "referenced by the image header" in detail["0"]
    assert "referenced by the active L1 table" in detail[str(h["l1_table_offset"] // cs)]
    assert f"(guest offset {MiB:#x})" in detail[str(data_host // cs)]
    assert "compressed" in detail[str(comp_cluster)] and "(guest offset 0x0)" in \
        detail[str(comp_cluster)]


@pytest.mark.parametrize("entry,value", [(0, 0x20123),       # unaligned: qemu's repair fails
                                         (1, 0x7770000)])    # past EOF: qemu grows the file
def test_repair_all_rebuilds_a_damaged_refcount_table(capsys, tmp_path, entry, value):
    """-r all rebuilds refcount structures whose table is damaged, so that
    qemu-img check is clean, without touching guest data; a refcount block
    past the end of the file grows it to hold the block, as qemu's check."""
    p = qemu_create(tmp_path / "t.qcow2", 4 * MiB)
    qemu_io(p, "write -P 1 0 1M", "write -P 2 3M 100k")
    before, size = qemu_raw(p), os.path.getsize(p)
    h = header(p)
    patch(p, h["refcount_table_offset"] + 8 * entry, ">Q", value)
    status, _, _ = cli(capsys, "check", "-r", "all", p)
    assert status == 0
    qemu_check(p)
    assert qemu_raw(p) == before
    assert os.path.getsize(p) == (value + 65536 if entry else size + 65536)


@pytest.mark.parametrize("also", ["", "zero"])
def test_repair_all_clears_reserved_l1_bits(capsys, tmp_path, also):
    """qemu reads through an L1 entry with reserved bits set and its -r all
    leaves them (exit 2); ours clears them, with or without a rebuild, so
    qemu-img check is clean and qemu reads the same data."""
    p = _damaged(tmp_path)
    before = qemu_raw(p)
    if also == "zero":
        _set_refcount(p, _host_cluster(p, 0), 0)        # forces a refcount rebuild
    h = header(p)
    (v,) = read_at(p, h["l1_table_offset"], ">Q")
    patch(p, h["l1_table_offset"], ">Q", v | (1 << 2) | (1 << 60))
    assert qemu_raw(p) == before
    assert cli(capsys, "check", p)[0] == 2
    status, out, err = cli(capsys, "check", "-r", "all", "--output=json", p)
    assert status == 0, err
    got = json.loads(out)
    assert got["corruptions-fixed"] >= 1 and not got.get("corruptions")
    assert "Repairing L1 entry with reserved bits set" in err
    qemu_check(p)
    assert qemu_raw(p) == before
    (v2,) = read_at(p, h["l1_table_offset"], ">Q")
    assert v2 == v


def _random_image(path, rng):
    """A qemu-made image: data, compressed, zero and discarded clusters and
    maybe a snapshot; returns (path, cluster size)."""
    cs, rb = rng.choice([512, 4096, 65536]), rng.choice([1, 8, 16, 64])
    p = qemu_create(path, 2 * MiB, cluster_size=cs, refcount_bits=rb)
    cmds = []
    if rb > 1:          # qemu-io writes compressed clusters only into empty ones, rb > 1
        cmds.append(f"write -c -P 9 {rng.randrange(0, 2 * MiB // cs) * cs} {cs}")
    for _ in range(8):
        off, n = rng.randrange(0, 2 * MiB - 64 * KiB), rng.randrange(1, 64 * KiB)
        cmds.append(rng.choice([f"write -P {rng.randrange(1, 255)} {off} {n}",
                                f"write -z {off} {n}", f"discard {off // cs * cs} {cs}"]))
    qemu_io(p, *cmds)
    if rb > 1 and rng.random() < 0.5:       # a snapshot needs refcounts of 2
        qemu_img("snapshot", "-c", "s", p)
        qemu_io(p, f"write -P 7 {rng.randrange(0, MiB)} 3000")
    return p, cs


def _metadata_words(path, cs):
    """File offsets of the 8-byte L1/L2 entries and refcount block words."""
    h = header(path)
    words = [h["l1_table_offset"] + 8 * i for i in range(h["l1_size"])]
    for l1e in (read_at(path, w, ">Q")[0] & 0x00FFFFFFFFFFFE00 for w in list(words)):
        if l1e:
            words += [l1e + 8 * i for i in range(cs // 8)]
    (rb,) = read_at(path, h["refcount_table_offset"], ">Q")
    words += [rb + 8 * i for i in range(min(cs // 8, 64))]
    return words


@pytest.mark.parametrize("seed", range(24))
def test_random_damage_agrees_with_qemu(capsys, tmp_path, seed):
    """Random images with random bits flipped in their metadata: check's
    JSON, messages and status equal qemu's; -r leaks agrees too."""
    import random
    rng = random.Random(seed)
    p, cs = _random_image(tmp_path / "r.qcow2", rng)
    words = _metadata_words(p, cs)
    for _ in range(rng.randrange(1, 4)):
        w = rng.choice(words)
        (v,) = read_at(p, w, ">Q")
        patch(p, w, ">Q", v ^ (1 << rng.choice([0, 1, 9, 17, 30, 40, 62, 63])))
    assert_same_as_qemu(capsys, p)
    q = str(tmp_path / "q.qcow2")
    shutil.copy(p, q)
    q_status, q_json, q_err = qemu_json_check(q, "-r", "leaks")
    status, out, err = cli(capsys, "check", "-r", "leaks", "--output=json", p)
    assert status == q_status, (err, q_err)
    if q_json is not None:
        q_json.pop("filename")
        got = json.loads(out)
        got.pop("filename")
        assert got == q_json, (err, q_err)


def test_tallies_saturate():
    """Expected refcounts are held in uint32 and stop at its maximum
    instead of wrapping to 0 (which would hide an overflow)."""
    import numpy as np
    from qcow2fast._ext.kernels import tally_add
    counts = np.array([0xFFFFFFFD, 7], dtype=np.uint32)
    tally_add(counts, np.array([0, 0, 0, 0, 1], dtype=np.int64))
    assert counts.tolist() == [0xFFFFFFFF, 8]
    with pytest.raises(IndexError):
        tally_add(counts, np.array([2], dtype=np.int64))


@pytest.mark.parametrize("cs", [4096, 65536])
def test_unreadable_refcount_block_agrees_with_qemu(capsys, tmp_path, cs):
    """A refcount table entry that is not cluster aligned: qemu cannot read
    the refcounts that block holds ("Can't get refcount ...") and says so
    per cluster; the COPIED checks skip those clusters."""
    p = qemu_create(tmp_path / "t.qcow2", 4 * MiB, cluster_size=cs)
    _fill(p, cs)
    h = header(p)
    (e,) = read_at(p, h["refcount_table_offset"], ">Q")
    patch(p, h["refcount_table_offset"], ">Q", e + 0x200)
    j = assert_same_as_qemu(capsys, p)
    assert j["check-errors"] > 0
