"""The NBD server against a hand-written raw client: the protocol's error
replies for malformed and forbidden requests, dropped connections for
broken framing -- and, each time, a server that keeps serving other
clients and an image that stays clean."""

import socket

import pytest

import qcow2fast
from qcow2fast.nbd import MAX_PAYLOAD
from qcow2fast.nbd import protocol as P

from tests.helpers.nbd_util import RawClient, served
from tests.helpers.qemu_util import (QCOW_OFLAG_COPIED, MiB, header, is_marked_corrupt,
                                     l2_entry_offset, patch, qemu_check, qemu_compare, qemu_create,
                                     qemu_io, qemu_raw)

pytestmark = pytest.mark.qemu

SIZE = 4 * MiB


@pytest.fixture
def image(tmp_path, qemu):
    path = qemu_create(tmp_path / "p.qcow2", SIZE)
    qemu_io(path, "write -P 0x5a 0 1M")
    return path


@pytest.fixture
def server(image, tmp_path):
    with served(image, tmp_path) as (srv, uri):
        yield srv
    qemu_check(image)


def client(server, **kw):
    return RawClient(server.address, **kw)


def assert_still_serving(server):
    """Another client can still connect and read."""
    c = client(server)
    c.go()
    r = c.read(0, 4096)
    assert r.error == 0 and r.data == b"\x5a" * 4096
    c.disconnect()


# -- handshake -------------------------------------------------------------------------------


def test_garbage_instead_of_option_magic_drops_only_that_client(server):
    c = client(server)
    c.sock.sendall(b"GARBAGE!" * 4)
    assert c.at_eof()
    assert_still_serving(server)


def test_unknown_client_flags_drop_the_connection(server):
    c = client(server, handshake=False)
    c.greet(client_flags=1 << 7)
    assert c.at_eof()
    assert_still_serving(server)


def test_unknown_and_malformed_options_are_answered_and_haggling_goes_on(server):
    c = client(server)
    assert c.option(99, b"whatever")[0][0] == P.NBD_REP_ERR_UNSUP
    assert c.option(P.NBD_OPT_STARTTLS)[0][0] == P.NBD_REP_ERR_POLICY
    assert c.option(P.NBD_OPT_GO, b"\x00\x00\x10")[0][0] == P.NBD_REP_ERR_INVALID
    assert c.option(P.NBD_OPT_LIST, b"x")[0][0] == P.NBD_REP_ERR_INVALID
    # Meta contexts need structured replies first.
    assert c.option(P.NBD_OPT_SET_META_CONTEXT, c.meta_data("", ["base:allocation"])) \
        [0][0] == P.NBD_REP_ERR_INVALID
    assert c.option(P.NBD_OPT_GO, c.go_data("nope"))[0][0] == P.NBD_REP_ERR_UNKNOWN
    assert c.option(P.NBD_OPT_LIST) == [(P.NBD_REP_SERVER, b"\x00\x00\x00\x00"),
                                         (P.NBD_REP_ACK, b"")]
    size, flags = c.go()
    assert size == SIZE and flags & P.NBD_FLAG_CAN_MULTI_CONN
    assert c.read(0, 512).data == b"\x5a" * 512
    c.disconnect()


def test_info_list_meta_context_and_abort(server):
    c = client(server)
    replies = c.option(P.NBD_OPT_INFO, c.go_data("", [P.NBD_INFO_BLOCK_SIZE, P.NBD_INFO_NAME]))
    infos = {P.U16.unpack(d[:2])[0]: d for t, d in replies if t == P.NBD_REP_INFO}
    assert P.INFO_BLOCK_SIZE.unpack(infos[P.NBD_INFO_BLOCK_SIZE])[1:] == (1, 4096, MAX_PAYLOAD)
    assert P.INFO_EXPORT.unpack(infos[P.NBD_INFO_EXPORT])[1] == SIZE
    assert c.option(P.NBD_OPT_STRUCTURED_REPLY) == [(P.NBD_REP_ACK, b"")]
    listed = c.option(P.NBD_OPT_LIST_META_CONTEXT, c.meta_data("", []))
    assert sorted(d[4:].decode() for t, d in listed if t == P.NBD_REP_META_CONTEXT) == \
        ["base:allocation", "qemu:allocation-depth"]
    listed = c.option(P.NBD_OPT_LIST_META_CONTEXT, c.meta_data("", ["qemu:"]))
    assert [d[4:] for t, d in listed[:-1]] == [b"qemu:allocation-depth"]
    assert c.option(P.NBD_OPT_ABORT) == [(P.NBD_REP_ACK, b"")]
    assert c.at_eof()


def test_option_too_long_is_refused_and_dropped(server):
    c = client(server)
    c.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_GO, 1 << 30))
    magic, opt, rtype, n = P.OPTION_REPLY.unpack(c.recv_exact(P.OPTION_REPLY.size))
    assert rtype == P.NBD_REP_ERR_TOO_BIG
    c.recv_exact(n)
    assert c.at_eof()
    assert_still_serving(server)


def test_export_name_option_old_style(server):
    c = client(server)
    c.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_EXPORT_NAME, 0))
    size, flags = P.EXPORT_NAME_REPLY.unpack(c.recv_exact(P.EXPORT_NAME_REPLY.size))
    assert size == SIZE and flags & P.NBD_FLAG_HAS_FLAGS
    r = c.read(SIZE - 4096, 4096)            # simple replies: nothing negotiated
    assert r.error == 0 and r.data == bytes(4096)
    assert c.read(SIZE - 4096, 8192).error == P.NBD_EINVAL
    assert c.read(0, 3).data == b"\x5a" * 3
    c.disconnect()


def test_export_name_option_for_an_unknown_export_drops_the_connection(server):
    c = client(server)
    c.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_EXPORT_NAME, 4) + b"nope")
    assert c.at_eof()                     # the option has no way to report an error
    assert_still_serving(server)


# -- transmission ---------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [True, False])
def test_bad_requests_get_errors_and_the_connection_goes_on(server, structured):
    c = client(server)
    c.go(structured=structured)
    assert c.request(42).error == P.NBD_EINVAL                     # unknown command
    assert c.request(P.NBD_CMD_CACHE, SIZE - 512, 1024).error == P.NBD_EINVAL   # past the end
    assert c.request(P.NBD_CMD_READ, 0, 512, flags=1 << 9).error == P.NBD_EINVAL
    assert c.read(SIZE - 512, 1024).error == P.NBD_EINVAL          # past the end
    assert c.read(2 ** 63, 512).error == P.NBD_EINVAL
    assert c.read(0, MAX_PAYLOAD + 1).error == P.NBD_EINVAL        # too large
    assert c.write(SIZE - 10, b"x" * 20).error == P.NBD_ENOSPC      # payload skipped
    too_big = c.write(0, bytes(MAX_PAYLOAD + 4096))                 # refused, not written
    assert too_big.error == P.NBD_EINVAL
    bs = c.request(P.NBD_CMD_BLOCK_STATUS, 0, 4096)                 # no context selected
    if structured:
        assert bs.error == P.NBD_EINVAL and "context" in bs.message
    r = c.read(4096, 8192)
    assert r.error == 0 and r.data == b"\x5a" * 8192
    c.disconnect()
    assert_still_serving(server)


def test_read_with_df_larger_than_the_maximum_is_eoverflow(server):
    c = client(server)
    c.go()
    assert c.read(0, MAX_PAYLOAD + 512, flags=P.NBD_CMD_FLAG_DF).error == P.NBD_EOVERFLOW
    assert c.read(0, 65536, flags=P.NBD_CMD_FLAG_DF).data == b"\x5a" * 65536
    c.disconnect()


def test_holes_are_sent_as_hole_chunks(server):
    """Structured reads of 64 KiB or more describe what reads as zeros with
    OFFSET_HOLE chunks; with DF a mixed read stays one data chunk."""
    c = client(server)
    _, tflags = c.go()
    assert tflags & P.NBD_FLAG_SEND_DF
    data = b"\x5a" * MiB                     # the image: 1 MiB of data, then unallocated
    r = c.read(MiB // 2, MiB)
    assert r.error == 0 and r.data == data[MiB // 2:] + bytes(MiB // 2)
    assert [t for t, _ in r.chunks] == [P.NBD_REPLY_TYPE_OFFSET_DATA, P.NBD_REPLY_TYPE_OFFSET_HOLE]
    for flags in (0, P.NBD_CMD_FLAG_DF):
        r = c.read(2 * MiB, MiB, flags=flags)
        assert r.data == bytes(MiB) and [t for t, _ in r.chunks] == [P.NBD_REPLY_TYPE_OFFSET_HOLE]
    r = c.read(MiB // 2, MiB, flags=P.NBD_CMD_FLAG_DF)
    assert [t for t, _ in r.chunks] == [P.NBD_REPLY_TYPE_OFFSET_DATA]
    assert r.data == data[MiB // 2:] + bytes(MiB // 2)
    small = c.read(3 * MiB, 4096)                # small reads: one data chunk, no lookup
    assert small.data == bytes(4096) and small.chunks[0][0] == P.NBD_REPLY_TYPE_OFFSET_DATA
    c.disconnect()


@pytest.mark.parametrize("structured", [False, True])
def test_cache_is_advertised_and_answered(server, structured):
    c = client(server)
    _, tflags = c.go(structured=structured)
    assert tflags & P.NBD_FLAG_SEND_CACHE
    assert c.request(P.NBD_CMD_CACHE, 0, SIZE).error == 0
    assert c.request(P.NBD_CMD_CACHE, 0, 0).error == 0
    assert c.request(P.NBD_CMD_CACHE, 4096, 512, flags=P.NBD_CMD_FLAG_DF).error == P.NBD_EINVAL
    assert c.read(0, 4096).data == b"\x5a" * 4096
    c.disconnect()


def test_bad_request_magic_drops_the_connection(server):
    c = client(server)
    c.go()
    c.sock.sendall(b"\xde\xad\xbe\xef" + bytes(24))
    assert c.at_eof()
    assert_still_serving(server)


def test_disconnect_in_the_middle_of_a_write_writes_nothing(server, image):
    c = client(server)
    c.go()
    c.sock.sendall(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_WRITE, 1, 0, 65536)
                   + b"\xee" * 30000)
    c.close()
    c.sock = None
    d = client(server)
    d.go()
    d.sock.sendall(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_READ, 7, 0, 4096)[:10])
    d.close()                                       # mid-header
    assert_still_serving(server)
    server.close()
    qemu_check(image)
    assert qemu_raw(image)[:MiB] == b"\x5a" * MiB


def test_write_fua_flush_trim_zero_and_block_status(server, image):
    expected = bytearray(qemu_raw(image, extra=["-U"]))     # the server holds it (locks)
    a, b = client(server), client(server)
    a.go(contexts=["base:allocation", "qemu:allocation-depth"])
    b.go()
    assert a.write(2 * MiB, b"\x61" * 70000, flags=P.NBD_CMD_FLAG_FUA).error == 0
    expected[2 * MiB:2 * MiB + 70000] = b"\x61" * 70000
    # Multi-conn: a flush on b covers a's write, which b reads too.
    assert b.request(P.NBD_CMD_FLUSH).error == 0
    assert b.read(2 * MiB, 70000).data == b"\x61" * 70000
    assert a.request(P.NBD_CMD_WRITE_ZEROES, 0, 128 << 10,
                     flags=P.NBD_CMD_FLAG_FAST_ZERO | P.NBD_CMD_FLAG_NO_HOLE).error == 0
    expected[:128 << 10] = bytes(128 << 10)
    assert a.request(P.NBD_CMD_TRIM, 512 << 10, 256 << 10).error == 0
    expected[512 << 10:768 << 10] = bytes(256 << 10)
    r = a.request(P.NBD_CMD_BLOCK_STATUS, 0, SIZE)
    chunks = {P.U32.unpack(p[:4])[0]: [P.BLOCK_DESCRIPTOR.unpack_from(p, 4 + 8 * i)
                                       for i in range((len(p) - 4) // 8)]
              for t, p in r.chunks if t == P.NBD_REPLY_TYPE_BLOCK_STATUS}
    ids = a.context_ids
    base, depth = chunks[ids["base:allocation"]], chunks[ids["qemu:allocation-depth"]]
    assert sum(n for n, _ in base) == SIZE and base[0] == (128 << 10, 3)
    assert base[1] == ((512 - 128) << 10, 0) and base[2] == (256 << 10, 3)
    assert depth[0][1] == 1 and depth[-1] == (SIZE - (2 << 20) - (128 << 10), 0)
    one = a.request(P.NBD_CMD_BLOCK_STATUS, 0, SIZE, flags=P.NBD_CMD_FLAG_REQ_ONE)
    assert all(len(p) == 12 for t, p in one.chunks)
    a.disconnect()
    b.disconnect()
    server.close()
    qemu_check(image)
    qemu_compare(image, bytes(expected))


def test_read_only_export_refuses_writes_with_eperm(image, tmp_path):
    with served(image, tmp_path, read_only=True) as (srv, uri):
        c = client(srv)
        _, flags = c.go()
        assert flags & P.NBD_FLAG_READ_ONLY
        assert c.write(0, b"x" * 4096).error == P.NBD_EPERM
        assert c.request(P.NBD_CMD_TRIM, 0, 65536).error == P.NBD_EPERM
        assert c.request(P.NBD_CMD_WRITE_ZEROES, 0, 65536).error == P.NBD_EPERM
        assert c.read(0, 4096).data == b"\x5a" * 4096
        c.disconnect()
    qemu_check(image)
    assert qemu_raw(image)[:MiB] == b"\x5a" * MiB


def test_fast_zero_refused_where_zeroing_writes_data(tmp_path, qemu):
    base = qemu_create(tmp_path / "b.qcow2", SIZE, compat="0.10")
    top = qemu_create(tmp_path / "t.qcow2", None, backing=base, compat="0.10")
    with served(top, tmp_path) as (srv, uri):
        c = client(srv)
        _, flags = c.go()
        assert flags & P.NBD_FLAG_SEND_FAST_ZERO
        r = c.request(P.NBD_CMD_WRITE_ZEROES, 0, 65536, flags=P.NBD_CMD_FLAG_FAST_ZERO)
        assert r.error == P.NBD_ENOTSUP
        assert c.request(P.NBD_CMD_WRITE_ZEROES, 0, 65536).error == 0
        c.disconnect()
    qemu_check(top)


def test_close_stops_a_server_with_idle_clients(image, tmp_path):
    with qcow2fast.open(image, "r+") as img:
        with served(img, tmp_path) as (srv, uri):
            idle = client(srv)
            idle.go()
            half = client(srv)                      # still haggling
            srv.close()
            assert idle.at_eof() and half.at_eof()
            with pytest.raises(OSError):
                socket.socket(socket.AF_UNIX).connect(srv.socket_path)
    qemu_check(image)


def test_shared_limit_queues_extra_clients(image, tmp_path):
    with served(image, tmp_path, shared=1) as (srv, uri):
        first = client(srv)
        first.go()
        second = RawClient(srv.address, handshake=False)    # waits in the backlog
        second.sock.settimeout(0.2)
        with pytest.raises(socket.timeout):
            second.sock.recv(1)
        first.disconnect()
        second.sock.settimeout(30)
        second.greet()
        second.go()
        assert second.read(0, 16).data == b"\x5a" * 16
        second.disconnect()


def test_a_failed_write_is_reported_not_acknowledged(image, tmp_path):
    """An L2 entry pointing at the refcount table: the image refuses the
    write (and marks itself corrupt); the client gets an error, the
    metadata is intact, and the server keeps answering."""
    rt = header(image)["refcount_table_offset"]
    patch(image, l2_entry_offset(image, 0), ">Q", QCOW_OFLAG_COPIED | rt)
    with open(image, "rb") as f:
        table_before = f.read()[rt:rt + 65536]
    with served(image, tmp_path) as (srv, uri):
        c = client(srv)
        c.go()
        r = c.write(0, b"\xee" * 4096)
        assert r.error == P.NBD_EIO and "holds metadata" in r.message, (r.error, r.message)
        assert c.write(MiB, b"\xee" * 4096).error in (P.NBD_EIO, P.NBD_EPERM)
        assert c.read(MiB - 4096, 4096).data == b"\x5a" * 4096
        c.disconnect()
    with open(image, "rb") as f:
        assert f.read()[rt:rt + 65536] == table_before
    assert is_marked_corrupt(image)


def test_adjacent_zero_and_unallocated_extents_make_one_hole(tmp_path):
    """A 32 KiB zero extent next to a 48 KiB unallocated one reads as zeros
    for 80 KiB: one hole, though each alone is under the 64 KiB minimum."""
    from qcow2fast.nbd.export import HOLE_MIN, Export
    p = str(tmp_path / "h.qcow2")
    qcow2fast.create(p, MiB, cluster_size=16384)
    with qcow2fast.open(p, "r+") as img:
        img.write(0, b"\x11" * 65536)
        img.write(64 << 10, b"\x22" * 32768)
        img.write_zeroes(64 << 10, 32768)               # zero clusters, allocated before
        img.write(144 << 10, b"\x33" * 16384)
        kinds = [(e.kind, e.length) for e in img.block_status(64 << 10, 80 << 10)]
        assert kinds == [("zero", 32768), ("unallocated", 49152)]
        assert 32768 < HOLE_MIN <= 80 << 10
        runs = Export(img).read_runs(0, 160 << 10)
    assert runs == [[False, 0, 64 << 10], [True, 64 << 10, 80 << 10], [False, 144 << 10, 16 << 10]]
