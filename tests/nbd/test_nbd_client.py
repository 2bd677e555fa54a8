"""qcow2fast as an NBD client (nbd/client.py): ``nbd://``/``nbd+unix://``
names, ``json:{"driver": "nbd", ...}`` and ``--image-opts driver=nbd``,
against qemu-nbd serving and compared with qemu-img 7.2 reading the same
export (qemu-iotests 209 and qemu-img-bitmaps); a server that breaks the
protocol is a clear error, never a hang or wrong data."""

import json
import random
import socket
import threading

import pytest

import qcow2fast
from qcow2fast.nbd import protocol as P
from qcow2fast.nbd.client import NbdClient, NbdError, parse_uri, uri_of
from qcow2fast.errors import InvalidArgumentError
from tests.helpers.cli_util import run_cli as cli
from tests.helpers.nbd_util import served, start_qemu_nbd, stop_server, unix_uri
from tests.helpers.qemu_util import qemu_create, qemu_img, qemu_io, qemu_raw

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def same_as_qemu(capsys, *argv):
    want = qemu_img(*argv, check=False)
    status, out, err = cli(capsys, *argv)
    assert (status, out, err.replace("qcow2fast: ", "qemu-img: ")) == \
        (want.returncode, want.stdout_text, want.stderr_text), argv
    return out


@pytest.fixture
def qcow2_image(tmp_path):
    path = tmp_path / "disk.qcow2"
    qemu_create(path, 4 * MiB)
    qemu_io(path, "write -P 0x5a 0 512k", "write -P 0xa5 2M 64k")
    return path


def test_map_of_a_qcow2_export_as_qemu(capsys, tmp_path, qcow2_image):
    """qemu-iotests 209: the raw export of a qcow2 image, mapped with -f raw
    from base:allocation, and read, as qemu-img does it."""
    sock = str(tmp_path / "q.sock")
    p = start_qemu_nbd(["-k", sock, "-x", "exp", "-r", "-t", "-f", "qcow2", qcow2_image], sock)
    try:
        uri = unix_uri(sock, "exp")
        for argv in (["map", "-f", "raw", "--output=json", uri], ["map", "-f", "raw", uri],
                     ["info", uri], ["info", "--output=json", uri]):
            same_as_qemu(capsys, *argv)
        out = tmp_path / "copy.raw"
        assert cli(capsys, "convert", "-f", "raw", "-O", "raw", uri, out)[0] == 0
        assert out.read_bytes() == qemu_raw(qcow2_image)
    finally:
        stop_server(p)


def test_a_qcow2_file_served_raw_reads_as_qcow2(capsys, tmp_path, qcow2_image):
    """A qcow2 file exported as raw bytes (qemu-nbd -f raw) opens as qcow2
    over the connection: info, check, map and compare as qemu-img."""
    sock = str(tmp_path / "r.sock")
    p = start_qemu_nbd(["-k", sock, "-r", "-t", "-f", "raw", qcow2_image], sock)
    try:
        uri = unix_uri(sock)
        for argv in (["info", uri], ["check", uri], ["map", "--output=json", uri],
                     ["compare", uri, qcow2_image]):
            same_as_qemu(capsys, *argv)
        with qcow2fast.open(uri) as img:
            assert img.read(2 * MiB, 65536) == b"\xa5" * 65536
    finally:
        stop_server(p)


def test_one_connection_per_command(capsys, tmp_path, qcow2_image):
    """A qemu-nbd without --persistent serves one connection: probing the
    format and opening the image take the same one, as qemu-img does."""
    sock = str(tmp_path / "once.sock")
    p = start_qemu_nbd(["-k", sock, "-r", "-f", "raw", qcow2_image], sock)
    try:
        status, out, err = cli(capsys, "info", unix_uri(sock))
        assert status == 0, err
        assert "file format: qcow2" in out
    finally:
        stop_server(p)


def test_dirty_bitmap_through_x_dirty_bitmap(capsys, tmp_path, qcow2_image):
    """qemu-img-bitmaps: --image-opts driver=nbd,...,x-dirty-bitmap=CTX maps
    that context's flags in base:allocation's place (dirty: not data)."""
    qemu_img("bitmap", "--add", qcow2_image, "b0")
    qemu_io(qcow2_image, "write -P 1 1M 128k")
    sock = str(tmp_path / "b.sock")
    p = start_qemu_nbd(["-k", sock, "-r", "-t", "-f", "qcow2", "-B", "b0", qcow2_image], sock)
    try:
        node = f"driver=nbd,server.type=unix,server.path={sock}"
        out = same_as_qemu(capsys, "map", "--output=json", "--image-opts",
                           node + ",x-dirty-bitmap=qemu:dirty-bitmap:b0")
        dirty = [e for e in json.loads(out) if not e["data"]]
        assert [(e["start"], e["length"]) for e in dirty] == [(MiB, 128 << 10)]
        same_as_qemu(capsys, "info", "--image-opts", node)
        same_as_qemu(capsys, "info", "--output=json",
                     "json:" + json.dumps({"driver": "nbd", "server": {"type": "unix",
                                                                       "path": sock}}))
        status, _, err = cli(capsys, "map", "--image-opts",
                             node + ",x-dirty-bitmap=qemu:dirty-bitmap:nope")
        assert status == 1 and "x-dirty-bitmap qemu:dirty-bitmap:nope not found" in err
    finally:
        stop_server(p)


def test_allocation_depth_through_x_dirty_bitmap(capsys, tmp_path):
    """nbd-qemu-allocation: qemu:allocation-depth read in base:allocation's
    place -- depth 2 is ZERO without HOLE, data that reads as zeros ("zero"
    and "data" both true), depth 1 a HOLE (not present), 0 data."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_create(base, 4 * MiB)
    qemu_io(base, "write -P 1 0 2M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    qemu_io(top, "write -P 2 1M 2M")
    sock = str(tmp_path / "a.sock")
    p = start_qemu_nbd(["-k", sock, "-r", "-t", "-f", "qcow2", "-A", top], sock)
    try:
        out = same_as_qemu(capsys, "map", "--output=json", "--image-opts",
                           f"driver=nbd,server.type=unix,server.path={sock},"
                           "x-dirty-bitmap=qemu:allocation-depth")
        assert [(e["start"], e["zero"], e["data"], e["present"]) for e in json.loads(out)] == \
            [(0, True, True, True), (MiB, False, False, False), (3 * MiB, False, True, True)]
    finally:
        stop_server(p)


def test_reads_through_our_own_server(tmp_path, qcow2_image):
    """qcow2fast serve's export read back by the client, tcp and unix."""
    want = qemu_raw(qcow2_image)
    for tcp in (False, True):
        with served(str(qcow2_image), tmp_path, tcp=tcp, read_only=True) as (_, uri):
            client = NbdClient(uri)
            try:
                assert client.size == len(want)
                assert client.pread(0, len(want)) == want
                status = client.block_status(0, client.size)
                assert status and sum(n for n, _ in status) <= client.size
            finally:
                client.close()


def test_pipelined_reads_from_many_threads_as_qemu_nbd_serves_them(tmp_path):
    """Eight threads reading at once through one connection (their requests
    in flight together, the replies read by whichever waits): every read
    gets its own bytes, holes included (structured replies of qemu-nbd)."""
    path = tmp_path / "disk.qcow2"
    qemu_create(path, 16 * MiB)
    qemu_io(path, *(f"write -P {i + 1} {i * MiB + 4096 * i} {MiB // 2}" for i in range(16)))
    want = qemu_raw(path)
    sock = tmp_path / "q.sock"
    server = start_qemu_nbd(["-r", "-t", "-f", "qcow2", "-k", str(sock), str(path)], sock)
    client = NbdClient(unix_uri(sock))
    errors = []

    def reader(seed):
        rng = random.Random(seed)
        try:
            for _ in range(40):
                off = rng.randrange(0, len(want) - 1)
                n = rng.randrange(1, min(3 * MiB, len(want) - off) + 1)
                buf = bytearray(b"\xee" * n)
                client.readinto(off, buf)
                assert buf == want[off:off + n], (off, n)
        except BaseException as e:      # (the assertion is checked in the main thread)
            errors.append(e)
    try:
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert client.pread(0, len(want)) == want
    finally:
        client.close()
        stop_server(server)


# -- writing: a conversion into an export (ops/nbd_target.py) -------------------------------

def ova_exports(tmp_path, n):
    """``n`` tar-like files, each served raw from offset 1536 by qemu-nbd
    (qemu-iotests 302's OVA): [(process, uri, file)]."""
    out = []
    for k in range(n):
        f = tmp_path / f"ova{k}.tar"
        f.write_bytes(b"x" * 1536)
        with open(f, "r+b") as fh:
            fh.truncate(1536 + 2 * MiB)
        sock = str(tmp_path / f"ova{k}.sock")
        p = start_qemu_nbd(["-k", sock, "-x", "exp", "-t", "-f", "raw", "--offset", "1536",
                            str(f)], sock)
        out.append((p, unix_uri(sock, "exp"), f))
    return out


@pytest.mark.parametrize("compress", [True, False])
def test_convert_into_an_export_as_qemu(capsys, tmp_path, compress):
    """qemu-iotests 302: a new qcow2 image written onto an export; qemu-img
    checks and compares it through the export, its end where qemu-img's
    own conversion into a twin export ends, the bytes before the offset
    untouched."""
    src = tmp_path / "src.qcow2"
    qemu_create(src, 1 << 30)
    qemu_io(src, "write -P 7 1M 64k", "write -z 4M 64k", "write -P 9 100M 192k")
    c = ["-c"] if compress else []
    servers = ova_exports(tmp_path, 2)
    try:
        (_, ours, f), (_, theirs, _) = servers
        assert cli(capsys, "convert", "-f", "qcow2", "-O", "qcow2", *c, str(src), ours)[0] == 0
        qemu_img("convert", "-f", "qcow2", "-O", "qcow2", *c, str(src), theirs)
        qemu_img("compare", str(src), ours)
        end = [json.loads(qemu_img("check", "--output=json", u, check=False).stdout_text)
               for u in (ours, theirs)]
        assert end[0]["check-errors"] == 0 and not end[0].get("leaks")
        assert end[0]["image-end-offset"] == end[1]["image-end-offset"]
        assert f.read_bytes()[:1536] == b"x" * 1536
    finally:
        for p, _, _ in servers:
            stop_server(p)


def test_convert_into_our_own_server(capsys, tmp_path):
    """-S 0 writes the source's zeros as data: whole blocks of zeros go as
    write-zeroes, and must replace what the export held."""
    src, target = tmp_path / "src.qcow2", tmp_path / "target.raw"
    qemu_create(src, 3 * MiB)
    qemu_io(src, "write -P 3 0 64k", "write -P 4 2M 512k")
    target.write_bytes(b"\xff" * (4 * MiB))         # old bytes: the zeros must be written
    with served(str(target), tmp_path, fmt="raw") as (_, uri):
        assert cli(capsys, "convert", "-S", "0", "-O", "qcow2", str(src), uri)[0] == 0
        qemu_img("compare", str(src), uri)
    qemu_img("check", "-f", "qcow2", str(target))


@pytest.mark.parametrize("existing", [False, True])
def test_raw_into_an_export_as_qemu(capsys, tmp_path, existing):
    """-O raw [-n] into an export holding old bytes: the file behind it ends
    up byte for byte as after qemu-img's same conversion into a twin."""
    src = tmp_path / "src.qcow2"
    qemu_create(src, 3 * MiB)
    qemu_io(src, "write -P 5 64k 64k", "write -P 6 2M 1M")
    files, procs = [], []
    try:
        for k in range(2):
            f = tmp_path / f"exp{k}.raw"
            f.write_bytes(b"\xee" * (4 * MiB))
            sock = str(tmp_path / f"exp{k}.sock")
            procs.append(start_qemu_nbd(["-k", sock, "-t", "-f", "raw", str(f)], sock))
            files.append((f, unix_uri(sock)))
        n = ["-n"] if existing else []
        assert cli(capsys, "convert", *n, "-O", "raw", str(src), files[0][1])[0] == 0
        qemu_img("convert", *n, "-O", "raw", str(src), files[1][1])
    finally:
        for p in procs:
            stop_server(p)
    assert files[0][0].read_bytes() == files[1][0].read_bytes()
    assert files[0][0].read_bytes()[:3 * MiB] == qemu_raw(src)


def test_a_qcow2_image_in_an_export_written_through_the_engine(capsys, tmp_path):
    """An export holding a qcow2 file (qemu-nbd -f raw) opens for writing
    (``qcow2fast.open(uri, "r+")``, ``convert -n -O qcow2``): qemu-img then
    checks it clean and reads what was written; growing past the export
    is a clear ENOSPC error."""
    src, target = tmp_path / "src.qcow2", tmp_path / "target.qcow2"
    qemu_create(src, 2 * MiB)
    qemu_io(src, "write -P 3 0 64k", "write -P 4 1M 128k")
    qemu_img("create", "-q", "-f", "qcow2", str(target), "2M")
    with open(target, "r+b") as f:
        f.truncate(MiB)
    sock = str(tmp_path / "w.sock")
    p = start_qemu_nbd(["-k", sock, "-t", "-f", "raw", str(target)], sock)
    uri = unix_uri(sock)
    try:
        assert cli(capsys, "convert", "-n", "-O", "qcow2", str(src), uri)[0] == 0
        qemu_img("compare", str(src), uri)
        with qcow2fast.open(uri, "r+") as img:
            img.write(1536 * 1024, b"\x5a" * 4096)
            with pytest.raises(OSError, match="past the end|cannot grow") as e:
                for k in range(20):             # fresh clusters, until the export is full
                    img.write(k * 65536, bytes(range(256)) * 256)
            assert e.value.errno == 28
    finally:
        stop_server(p)
    got = qemu_io(target, "read -P 0x5a 1536k 4k", check=False)
    assert got.returncode == 0 and "Pattern verification failed" not in got.stdout_text
    assert qemu_img("check", str(target), check=False).returncode in (0, 3)   # (leaks at most)


def test_convert_into_an_export_refusals(capsys, tmp_path):
    src = tmp_path / "src.qcow2"
    qemu_create(src, 64 * MiB)
    qemu_io(src, "write -P 1 0 8M")
    small, ro = tmp_path / "small.raw", tmp_path / "ro.raw"
    small.write_bytes(bytes(MiB))
    ro.write_bytes(bytes(4 * MiB))
    with served(str(small), tmp_path, fmt="raw") as (_, uri):
        status, _, err = cli(capsys, "convert", "-O", "qcow2", str(src), uri)
        assert status == 1 and "past the end of the 1048576-byte export" in err
        status, _, err = cli(capsys, "convert", "-O", "raw", str(src), uri)
        assert status == 1 and "an NBD export cannot grow" in err
        status, _, err = cli(capsys, "convert", "-O", "qcow2", "-o", "extended_l2=on",
                             str(src), uri)
        assert status == 1 and "has no extended_l2" in err
    sock = str(tmp_path / "ro.sock")
    p = start_qemu_nbd(["-k", sock, "-r", "-t", "-f", "raw", str(ro)], sock)
    try:
        status, _, err = cli(capsys, "convert", "-O", "qcow2", str(src), unix_uri(sock))
        assert status == 1 and "read-only" in err
    finally:
        stop_server(p)
    assert ro.read_bytes() == bytes(4 * MiB)


@pytest.mark.parametrize("uri", ["nbd+unix:///x", "nbd://host/x?a=b", "nbd://",
                                 "nbd+unix://host/x?socket=s", "http://h/x"])
def test_bad_uris(uri):
    with pytest.raises(InvalidArgumentError):
        parse_uri(uri)


def test_uris_as_qemu_names_them():
    assert uri_of({"driver": "nbd", "path": "/s"}) == ("nbd+unix://?socket=/s", None)
    assert uri_of({"driver": "nbd", "server.type": "inet", "server.host": "h",
                   "export": "e", "x-dirty-bitmap": "c"}) == ("nbd://h:10809/e", "c")
    with pytest.raises(InvalidArgumentError, match="doesn't support the option 'tls'"):
        uri_of({"driver": "nbd", "path": "/s", "tls": "x"})


def hostile_server(tmp_path, script):
    """A server on a Unix socket that answers one connection with ``script(conn)``."""
    path = str(tmp_path / "bad.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def run():
        conn, _ = listener.accept()
        try:
            script(conn)
        except OSError:
            pass
        finally:
            conn.close()
            listener.close()
    threading.Thread(target=run, daemon=True).start()
    return f"nbd+unix://?socket={path}"


def recv_exact(conn, n):
    buf = b""
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            raise OSError("closed")
        buf += part
    return buf


def negotiate(conn, size=MiB):
    """The server's side of the handshake: no structured replies, then GO."""
    conn.sendall(P.SERVER_GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.NBD_FLAG_FIXED_NEWSTYLE))
    recv_exact(conn, 4)
    while True:
        _, option, length = P.OPTION_HEADER.unpack(recv_exact(conn, 16))
        recv_exact(conn, length)
        if option != P.NBD_OPT_GO:
            conn.sendall(P.OPTION_REPLY.pack(P.NBD_OPT_REPLY_MAGIC, option,
                                             P.NBD_REP_ERR_UNSUP, 0))
            continue
        info = P.INFO_EXPORT.pack(P.NBD_INFO_EXPORT, size, P.NBD_FLAG_HAS_FLAGS)
        conn.sendall(P.OPTION_REPLY.pack(P.NBD_OPT_REPLY_MAGIC, option, P.NBD_REP_INFO,
                                         len(info)) + info)
        conn.sendall(P.OPTION_REPLY.pack(P.NBD_OPT_REPLY_MAGIC, option, P.NBD_REP_ACK, 0))
        return


def test_a_server_that_is_not_nbd(tmp_path):
    uri = hostile_server(tmp_path, lambda c: c.sendall(b"HTTP/1.1 400 Bad Request\r\n" * 2))
    with pytest.raises(NbdError, match="protocol error in greeting"):
        NbdClient(uri, timeout=10)


def test_a_reply_with_the_wrong_cookie(tmp_path):
    def script(conn):
        negotiate(conn)
        _, _, _, cookie, _, length = P.REQUEST.unpack(recv_exact(conn, P.REQUEST.size))
        conn.sendall(P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, 0, cookie + 1)
                     + bytes(length))
    client = NbdClient(hostile_server(tmp_path, script), timeout=10)
    assert client.size == MiB and client.block_status(0, MiB) is None
    with pytest.raises(NbdError, match="protocol error in reply"):
        client.pread(0, 4096)


def test_a_server_that_stops_answering(tmp_path):
    """No reply: the read fails after the timeout instead of hanging."""
    def script(conn):
        negotiate(conn)
        recv_exact(conn, P.REQUEST.size)
        conn.recv(1)                     # waits for the client to give up
    client = NbdClient(hostile_server(tmp_path, script), timeout=1)
    with pytest.raises(OSError):
        client.pread(0, 4096)


def test_an_export_that_is_not_there(tmp_path):
    def script(conn):
        conn.sendall(P.SERVER_GREETING.pack(P.NBDMAGIC, P.IHAVEOPT,
                                            P.NBD_FLAG_FIXED_NEWSTYLE))
        recv_exact(conn, 4)
        while True:
            _, option, length = P.OPTION_HEADER.unpack(recv_exact(conn, 16))
            recv_exact(conn, length)
            msg = b"no such export" if option == P.NBD_OPT_GO else b""
            conn.sendall(P.OPTION_REPLY.pack(P.NBD_OPT_REPLY_MAGIC, option,
                                             P.NBD_REP_ERR_UNKNOWN, len(msg)) + msg)
    with pytest.raises(NbdError, match="Requested export not available: no such export"):
        NbdClient(hostile_server(tmp_path, script), timeout=10)



def test_replies_out_of_order_reach_their_requests(tmp_path):
    """The server takes three reads before it answers any, then answers
    the last first: each reader gets its own offset's bytes (one request at
    a time per connection would never get a reply here)."""
    def script(conn):
        negotiate(conn)
        asked = [P.REQUEST.unpack(recv_exact(conn, P.REQUEST.size)) for _ in range(3)]
        for _, _, _, cookie, offset, length in reversed(asked):
            conn.sendall(P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, 0, cookie)
                         + bytes([offset // 4096]) * length)
        recv_exact(conn, 1)
    client = NbdClient(hostile_server(tmp_path, script), timeout=10)
    got = {}
    threads = [threading.Thread(target=lambda k=k: got.update({k: client.pread(
        k * 4096, k * 4096 + 4096)})) for k in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {k: bytes([k]) * 4096 for k in (1, 2, 3)}
    client.close()


def test_a_lost_connection_fails_every_request_in_flight(tmp_path):
    """Two reads in flight, then a reply to a cookie nobody sent: both
    readers get the protocol error, and so does the next request."""
    def script(conn):
        negotiate(conn)
        recv_exact(conn, 2 * P.REQUEST.size)
        conn.sendall(P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, 0, 99) + bytes(4096))
        conn.recv(1)
    client = NbdClient(hostile_server(tmp_path, script), timeout=10)
    failed = []

    def read(k):
        try:
            client.pread(k * 4096, k * 4096 + 4096)
        except NbdError as e:
            failed.append(str(e))
    threads = [threading.Thread(target=read, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(failed) == ["protocol error in reply: a simple reply to cookie 99"] * 2
    with pytest.raises(NbdError, match="cookie 99"):
        client.pread(0, 512)
