"""``serve -B NAME``: persistent dirty bitmaps exported as qemu-nbd exports
them (``qemu:dirty-bitmap:NAME``, flag 1 dirty), several contexts in one
BLOCK_STATUS reply, and the incremental backup that backup tools build on
it (full copy, dirty extents only, clear, again; restored = the image)."""

import json
import struct

import pytest

import qcow2fast
from qcow2fast.nbd import protocol as P

from tests.helpers.cli_util import run_cli
from tests.helpers.nbd_util import (RawClient, nbdcopy, nbdinfo, served, side_by_side,
                                    start_cli, stop_server, unix_uri)
from tests.helpers.qemu_util import (MiB, qemu_check, qemu_compare, qemu_create,
                                     qemu_img, qemu_io, run)

pytestmark = pytest.mark.qemu

SIZE = 16 * MiB
CONTEXTS = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0",
            "qemu:dirty-bitmap:b1"]


@pytest.fixture
def image(tmp_path, qemu):
    """Bitmaps made and filled by qemu: b0 (64 KiB granules), b1 (1 MiB)."""
    base = qemu_create(tmp_path / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x11 0 4M")
    path = qemu_create(tmp_path / "b.qcow2", None, backing=base)
    qemu_img("bitmap", "--add", path, "b0")
    qemu_img("bitmap", "--add", "-g", "1M", path, "b1")
    qemu_io(path, "write -P 0x21 100k 10k", "write -z 3M 2M", "discard 8M 64k",
            "write -P 0x22 12345678 70000")
    return path


def block_status_chunks(uri, _):
    """One BLOCK_STATUS over the whole disk with every context selected:
    the reply's chunks as (flags, type, context name, descriptors)."""
    c = RawClient(uri.split("socket=")[1])
    c.go(contexts=CONTEXTS)
    names = {i: n for n, i in c.context_ids.items()}
    out = []
    for req_flags in (0, P.NBD_CMD_FLAG_REQ_ONE):
        handle = c.send_request(P.NBD_CMD_BLOCK_STATUS, 0, SIZE, req_flags)
        while True:
            magic, flags, rtype, h, n = P.STRUCTURED_REPLY.unpack(
                c.recv_exact(P.STRUCTURED_REPLY.size))
            assert magic == P.NBD_STRUCTURED_REPLY_MAGIC and h == handle
            payload = c.recv_exact(n)
            cid = struct.unpack(">I", payload[:4])[0]
            out.append((flags, rtype, names[cid],
                        [P.BLOCK_DESCRIPTOR.unpack_from(payload, 4 + 8 * i)
                         for i in range((n - 4) // 8)]))
            if flags & P.NBD_REPLY_FLAG_DONE:
                break
    c.disconnect()
    return out


def test_several_contexts_in_one_reply_as_qemu_nbd(image, tmp_path):
    args = ["-r", "-t", "-A", "-B", "b0", "-B", "b1"]
    theirs, ours = side_by_side(tmp_path, args, image, block_status_chunks)
    # base:allocation may differ inside a data cluster: qemu also asks the
    # host file for holes there (ZERO without HOLE); the rest is the same.
    def same_but_base(chunks):
        return [c if c[2] != "base:allocation" else c[:3] for c in chunks]
    assert same_but_base(ours) == same_but_base(theirs)
    assert {c[2] for c in ours} == set(CONTEXTS)
    # One chunk per context, only the last of each reply flagged DONE.
    assert [c[0] for c in ours] == [0, 0, 0, 1, 0, 0, 0, 1]


def test_nbdinfo_map_of_each_bitmap_as_qemu_nbd(image, tmp_path):
    for name in ("b0", "b1"):
        theirs, ours = side_by_side(
            tmp_path, ["-r", "-B", name], image,
            lambda uri, _: nbdinfo(f"--map=qemu:dirty-bitmap:{name}", uri).stdout_text)
        assert ours == theirs and "dirty" in ours


def test_writes_through_the_export_mark_the_bitmap_live(image, tmp_path):
    """Writes by NBD clients are in the exported bitmap at once, and in the
    image's bitmap after the server stops, as with qemu-nbd."""
    def write_then_map(uri, path):
        qemu_io(uri, "write -P 0x33 6M 4k", "write -z 10M 128k", fmt="raw")
        return nbdinfo("--map=qemu:dirty-bitmap:b0", uri).stdout_text
    theirs, ours = side_by_side(tmp_path, ["-t", "-B", "b0"], image, write_then_map,
                                copy=True)
    assert ours == theirs
    for name in ("qemu", "ours"):
        qemu_check(tmp_path / f"{name}-b.qcow2")
    after = side_by_side(tmp_path, ["-r", "-B", "b0"], tmp_path / "ours-b.qcow2",
                         lambda uri, _: nbdinfo("--map=qemu:dirty-bitmap:b0",
                                                uri).stdout_text)
    assert after == [ours, ours]


def test_inconsistent_or_missing_bitmap_is_refused_as_qemu_nbd(tmp_path, capsys, qemu):
    path = qemu_create(tmp_path / "c.qcow2", SIZE)
    qemu_img("bitmap", "--add", path, "crashed")
    qemu_io(path, "write 0 64k", "sigraise 9", check=False)       # left in use
    for name in ("crashed", "missing"):
        theirs = run(["qemu-nbd", "-r", "-k", tmp_path / "s", "-B", name, path], check=False)
        status, _, err = run_cli(capsys, "serve", "-r", "-k", tmp_path / "s", "-B", name, path)
        assert theirs.returncode == status == 1
        assert err.splitlines()[0] == \
            "qcow2fast: " + theirs.stderr_text.splitlines()[0].removeprefix("qemu-nbd: ")


def _dirty_ranges(uri, name):
    out = json.loads(nbdinfo("--json", f"--map=qemu:dirty-bitmap:{name}", uri).stdout_text)
    return [(e["offset"], e["length"]) for e in out if e["type"] & 1]


def _read_ranges(sock, ranges):
    """[(offset, data)]: only the given ranges, read over NBD."""
    c = RawClient(sock)
    c.go()
    out = []
    for off, n in ranges:
        r = c.read(off, n)
        assert r.error == 0
        out.append((off, r.data))
    c.disconnect()
    return out


def test_incremental_backup(image, tmp_path):
    """What backup tools do: full copy; writes (qemu-io, then qcow2fast);
    serve -B; copy only the dirty extents; clear the bitmap; more writes; a
    second increment; full + increments restored equals the image."""
    full = tmp_path / "full.raw"
    sock = str(tmp_path / "bk.sock")

    def serve_ro():
        return start_cli(["-r", "-t", "-k", sock, "-B", "b0", image], sock)

    qemu_img("bitmap", "--clear", image, "b0")        # the checkpoint of the full copy
    p = serve_ro()
    try:
        nbdcopy(unix_uri(sock), str(full))
    finally:
        assert stop_server(p) == 0
    increments = []
    for round_ in range(2):
        qemu_io(image, f"write -P 0x{0x40 + round_:x} {round_}M 70k", "write -z 9M 64k")
        with qcow2fast.open(image, "r+") as img:
            img.write(5 * MiB + 4096 * round_, b"\x5a" * 300000)
            img.discard(14 * MiB, 2 * MiB)
        p = serve_ro()
        try:
            ranges = _dirty_ranges(unix_uri(sock), "b0")
            assert ranges and sum(n for _, n in ranges) < SIZE // 2
            increments.append(_read_ranges(sock, ranges))
        finally:
            assert stop_server(p) == 0
        qemu_img("bitmap", "--clear", image, "b0")    # the next checkpoint
    restored = bytearray(full.read_bytes())
    for inc in increments:
        for off, data in inc:
            restored[off:off + len(data)] = data
    qemu_compare(image, bytes(restored))
    qemu_check(image)


def walk(uri, _):
    """BLOCK_STATUS of qemu:dirty-bitmap:b0 in steps of 1000000 bytes (not
    granule-aligned), without and with REQ_ONE."""
    c = RawClient(uri.split("socket=")[1])
    c.go(contexts=["qemu:dirty-bitmap:b0"])
    out = []
    for flags in (0, P.NBD_CMD_FLAG_REQ_ONE):
        for off in range(0, SIZE, 1000000):
            r = c.request(P.NBD_CMD_BLOCK_STATUS, off, min(1000000, SIZE - off), flags)
            payload = r.chunks[0][1]
            out.append([P.BLOCK_DESCRIPTOR.unpack_from(payload, 4 + 8 * i)
                        for i in range((len(payload) - 4) // 8)])
    c.disconnect()
    return out


@pytest.mark.parametrize("read_only", [True, False])
def test_unaligned_bitmap_requests_as_qemu_nbd(image, tmp_path, read_only):
    """Requests that start and end inside granules, with and without
    REQ_ONE, on a read-only and a writable export: the descriptors (packed
    in C from the live bitmap) are qemu-nbd's."""
    args = ["-B", "b0"] + (["-r"] if read_only else [])
    theirs, ours = side_by_side(tmp_path, args, image, walk)
    assert ours == theirs
    assert any(len(d) > 1 for d in theirs) and all(len(d) == 1 for d in theirs[len(theirs) // 2:])


def test_reply_with_more_runs_than_first_room_as_qemu_nbd(tmp_path, qemu):
    """A bitmap with 3000 runs (4 KiB granules, every other one written by
    qemu-io): one BLOCK_STATUS over the disk answers them all, and a walk
    in unaligned steps answers as qemu-nbd (more runs than the first room
    made in the send buffer: counted, then packed)."""
    from qcow2fast.nbd import contexts
    path = qemu_create(tmp_path / "m.qcow2", SIZE)
    qemu_img("bitmap", "--add", "-g", "4k", path, "b0")
    qemu_io(path, *[f"write -P 0x44 {k * 8192} 4k" for k in range(1500)])

    def whole_disk(uri, _):
        c = RawClient(uri.split("socket=")[1])
        c.go(contexts=["qemu:dirty-bitmap:b0"])
        payload = c.request(P.NBD_CMD_BLOCK_STATUS, 0, SIZE).chunks[0][1]
        c.disconnect()
        return [P.BLOCK_DESCRIPTOR.unpack_from(payload, 4 + 8 * i)
                for i in range((len(payload) - 4) // 8)]

    theirs = side_by_side(tmp_path, ["-r", "-B", "b0"], path, whole_disk)[0]
    assert len(theirs) == 3000 > contexts.BITMAP_ROOM
    with served(path, tmp_path, read_only=True, bitmaps=["b0"]) as (_, uri):
        assert whole_disk(uri, None) == theirs
    walks = side_by_side(tmp_path, ["-r", "-B", "b0"], path, walk)
    assert walks[1] == walks[0]
