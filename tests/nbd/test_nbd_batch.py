"""Pipelined READs reach the image as batches (nbd/transmission.py's
read_batch): every reply comes in order with the data of its request --
data, zero, compressed and unallocated clusters, a WRITE in the middle of
the pipeline, requests refused by the protocol, and a read the image fails
(a corrupt L2 entry), which gets its error reply while the others in its
batch get their data."""

import struct

import pytest

from qcow2fast.nbd import protocol as P

from tests.helpers.nbd_util import RawClient, served
from tests.helpers.qemu_util import (MiB, l2_entry_offset, patch_bytes, qemu_check, qemu_create,
                                     qemu_io, qemu_raw)

pytestmark = pytest.mark.qemu

SIZE = 4 * MiB
BAD = 3 * MiB               # its L2 entry gets a reserved bit: the image fails to read it


@pytest.fixture
def image(tmp_path, qemu):
    path = qemu_create(tmp_path / "p.qcow2", SIZE)
    qemu_io(path, "write -P 0x5a 0 1M", "write -z 1M 64k", "write -c -P 0x66 2M 64k",
            "write -P 0x77 3M 64k")
    return path


def pipeline(client, requests, depth=24):
    """Send ``depth`` requests at once, then read their replies in order
    (few enough that the replies fit in the socket's buffer)."""
    replies = []
    for a in range(0, len(requests), depth):
        group = requests[a:a + depth]
        handles = [client.send_request(*r) for r in group]
        replies += [client.reply(h, r[2] if r[0] == P.NBD_CMD_READ else 0)
                    for h, r in zip(handles, group)]
    return replies


@pytest.mark.parametrize("structured", [True, False])
def test_pipelined_reads(tmp_path, image, structured):
    expected = bytearray(qemu_raw(image))
    reads = [(P.NBD_CMD_READ, (k * 70001) % (SIZE - 8192), 1 + (k * 997) % 8192)
             for k in range(150)]
    reads[40:40] = [(P.NBD_CMD_WRITE, 4096, 100, 0, b"w" * 100),
                    (P.NBD_CMD_READ, 4000, 300)]
    reads[90:90] = [(P.NBD_CMD_READ, SIZE - 10, 20)]            # past the end: EINVAL
    with served(image, tmp_path) as (srv, _):
        c = RawClient(srv.address)
        c.go(structured=structured)
        replies = pipeline(c, reads)
        c.disconnect()
    model = bytearray(expected)
    for r, reply in zip(reads, replies):
        if r[0] == P.NBD_CMD_WRITE:
            model[r[1]:r[1] + r[2]] = r[4]
            assert reply.error == 0
        elif r[1] + r[2] > SIZE:
            assert reply.error == P.NBD_EINVAL
        else:
            assert reply.error == 0 and reply.data == bytes(model[r[1]:r[1] + r[2]]), r
    qemu_check(image)


def test_failed_read_in_a_batch(tmp_path, image):
    expected = qemu_raw(image)
    off = l2_entry_offset(image, BAD)
    with open(image, "rb") as f:
        f.seek(off)
        (entry,) = struct.unpack(">Q", f.read(8))
    patch_bytes(image, off, struct.pack(">Q", entry | 0x2))      # reserved bit 1
    reads = [(P.NBD_CMD_READ, 0, 4096), (P.NBD_CMD_READ, BAD, 4096),
             (P.NBD_CMD_READ, 8192, 4096), (P.NBD_CMD_READ, 2 * MiB, 4096)]
    with served(image, tmp_path, read_only=True) as (srv, _):
        c = RawClient(srv.address)
        c.go()
        replies = pipeline(c, reads)
        c.disconnect()
    assert replies[1].error != 0
    for i in (0, 2, 3):
        off, n = reads[i][1:3]
        assert replies[i].error == 0 and replies[i].data == expected[off:off + n]


@pytest.mark.parametrize("structured", [True, False])
def test_pipelined_writes_join_batches(tmp_path, image, structured):
    """WRITEs (allocating, overwriting, unaligned) pipelined with READs of
    the same ranges go to the image in batches and complete in order; a
    FUA write and one past the end are answered on their own."""
    import qcow2fast
    expected = bytearray(qemu_raw(image))
    reqs = []
    for k in range(12):
        off = [0, 1 * MiB + 512, 2 * MiB + 100, 3 * MiB + 64 * 1024, 3 * MiB + 70000][k % 5] \
            + 4096 * k
        data = bytes([k + 1]) * (300 + 97 * k)
        reqs.append((P.NBD_CMD_WRITE, off, len(data), 0, data))
        reqs.append((P.NBD_CMD_READ, off - 50 if off >= 50 else off, len(data) + 100))
    reqs[7:7] = [(P.NBD_CMD_WRITE, 5000, 10, P.NBD_CMD_FLAG_FUA, b"f" * 10),
                 (P.NBD_CMD_WRITE, SIZE - 4, 8, 0, b"x" * 8)]          # past the end: ENOSPC
    img = qcow2fast.open(image, "r+")
    seen = []
    submit = img.submit

    def counting_submit(requests):
        seen.append([op for op, _, _ in requests])
        return submit(requests)
    img.submit = counting_submit
    try:
        with served(img, tmp_path) as (srv, _):
            c = RawClient(srv.address)
            c.go(structured=structured)
            handles = list(range(c.handle + 1, c.handle + 1 + len(reqs)))
            # All at once, so that the server finds them received together.
            c.sock.sendall(b"".join(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, r[3] if len(r) > 3 else 0,
                                                   r[0], h, r[1], r[2]) + (r[4] if len(r) > 3
                                                                           else b"")
                                    for h, r in zip(handles, reqs)))
            c.handle += len(reqs)
            replies = [c.reply(h, r[2] if r[0] == P.NBD_CMD_READ else 0)
                       for h, r in zip(handles, reqs)]
            c.disconnect()
    finally:
        img.close()
    model = expected
    for r, reply in zip(reqs, replies):
        if r[0] == P.NBD_CMD_WRITE and r[1] + r[2] > SIZE:
            assert reply.error == P.NBD_ENOSPC
        elif r[0] == P.NBD_CMD_WRITE:
            assert reply.error == 0
            model[r[1]:r[1] + r[2]] = r[4]
        else:
            assert reply.error == 0 and reply.data == bytes(model[r[1]:r[1] + r[2]]), r
    assert max(ops.count("write") for ops in seen) >= 2, seen
    assert qemu_raw(image) == bytes(model)
    qemu_check(image)
