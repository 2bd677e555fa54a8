"""``qcow2fast serve``'s whole command line as qemu-nbd's: usage errors in
glibc getopt's and qemu-nbd's words (checked in the order qemu-nbd checks
them), ``-L`` (list a server's exports), ``-l`` (serve an internal
snapshot) and ``-s`` (writes to a temporary overlay), each run side by
side with qemu-nbd 7.2."""

import os

import pytest

from tests.helpers.cli_util import run_cli
from tests.helpers.nbd_util import (QEMU_NBD, nbdcopy, nbdinfo, side_by_side, start_cli,
                                    start_qemu_nbd, stop_server)
from tests.helpers.qemu_util import MiB, qemu_create, qemu_img, qemu_io, run
from tests.helpers.tls_util import make_certificates

pytestmark = pytest.mark.qemu

SIZE = 8 * MiB
LONG = "a" * 4097                       # past NBD_MAX_STRING_SIZE

# Command lines qemu-nbd refuses (SOCK: a socket path; IMG: an image).
# Left out, as deliberate differences (README, serve): -c/-d
# (the kernel's NBD client), --selinux-label, -T help (qcow2fast has no
# trace events), and the default bind address in a bad port's message.
BAD = [
    "-z IMG", "--bogus IMG", "--bogus=1 IMG", "IMG -p", "IMG --port", "--read-only=1 IMG",
    "--read=1 IMG", "--c=x IMG", "--p IMG", "--tls IMG", "--de IMG", "-rz IMG", "-rk", "",
    "IMG IMG", "--aio=threads --aio=threads IMG", "--discard=on --discard=on IMG",
    "--cache=none -n IMG", "-n -n IMG", "--cache=bogus --aio=bogus IMG",
    "--aio=bogus --cache=bogus IMG", "--detect-zeroes=unmap --discard=unmap IMG",
    "--discard=unmap --detect-zeroes=unmap --cache=bogus IMG", "-L IMG", "-L -x foo",
    "-L --cache=none", "-L --fork", "-o 0x10x IMG", "-o -1 IMG",
    "-o 99999999999999999999999 IMG", "-e 0x2 -e -3 IMG", "-e 3000000000 IMG", "-e 2x IMG",
    "--tls-authz a IMG", "--tls-hostname h IMG", "-l snap IMG", "-l snapshot.bogus=1 IMG",
    "-l snapshot.id=7 IMG", "-f bogus IMG", "NOFILE", "-- -x", f"-x {LONG} IMG",
    f"-D {LONG} IMG", "-T bogus=1 NOFILE", "-T foo NOFILE", "-T nbd_* NOFILE",
    "--image-opts -f qcow2 IMG", "-s -l snap1 IMG", "-k rel IMG",
]


@pytest.fixture
def image(tmp_path, qemu):
    img = qemu_create(tmp_path / "x.qcow2", SIZE)
    qemu_io(img, "write -P 0x11 0 1M")
    qemu_img("snapshot", "-c", "snap1", img)
    qemu_io(img, "write -P 0x22 0 512k")
    return img


@pytest.mark.parametrize("line", BAD, ids=lambda line: line[:40])
def test_usage_errors_like_qemu_nbd(line, image, tmp_path, capsys):
    names = {"SOCK": str(tmp_path / "s"), "IMG": str(image), "NOFILE": str(tmp_path / "no")}
    args = ["-k", names["SOCK"]] + [names.get(a, a) for a in line.split()]
    theirs = run(["qemu-nbd", *args], check=False, timeout=60)     # (argv[0] in its words)
    status, out, err = run_cli(capsys, "serve", *args)
    expected = _as_ours(theirs.stderr_text.replace("`qemu-nbd --help'",
                                                   "`qcow2fast serve --help'"))
    assert (status, out, err) == (theirs.returncode, theirs.stdout_text, expected)
    assert theirs.returncode == 1


def test_list_exports_like_qemu_nbd(image, tmp_path, capsys):
    """-L of either server by either tool: the same listing (name,
    description, size, flags, block sizes, metadata contexts)."""
    qemu_img("bitmap", "--add", image, "b0")
    args = ["-t", "-r", "-x", "exp1", "-D", "a description", "-A", "-B", "b0", image]
    listings = []
    for start in (start_qemu_nbd, start_cli):
        sock = str(tmp_path / f"{start.__name__}.sock")
        p = start(["-k", sock, *args], sock)
        try:
            listings.append(run([QEMU_NBD, "-L", "-k", sock]).stdout_text)
            status, out, _ = run_cli(capsys, "serve", "-L", "-k", sock)
            assert status == 0
            listings.append(out)
        finally:
            stop_server(p)
    assert listings[1:] == listings[:1] * 3
    assert "  description: a description\n" in listings[0]
    assert listings[0].endswith("   qemu:dirty-bitmap:b0\n")
    status, _, err = run_cli(capsys, "serve", "-L", "-k", str(tmp_path / "none"))
    assert status == 1 and "Failed to connect to" in err


def _as_ours(stderr):
    """qemu-nbd's stderr with our program's name."""
    return "".join(f"qcow2fast: {t[len('qemu-nbd: '):]}" if t.startswith("qemu-nbd: ") else t
                   for t in stderr.splitlines(keepends=True))


@pytest.mark.parametrize("tls_server", [True, False], ids=["tls-server", "plain-server"])
def test_list_over_tls_like_qemu_nbd(image, tmp_path, capsys, tls_server):
    """-L with client credentials (--tls-creds, --tls-hostname), of a TLS
    and of a plain server, each server qemu-nbd's and ours: what qemu-nbd
    -L prints, ours prints (the listing, or the refusal in qemu's words)."""
    pki = make_certificates(tmp_path / "pki")
    creds = ["--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=client",
             "--tls-creds", "tls0"]
    cases = [[], creds, [*creds, "--tls-hostname", "bogus"],
             [*creds, "--tls-hostname", "localhost"],
             ["--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server",
              "--tls-creds", "tls0", "--tls-hostname", "localhost"],
             ["--object", f"tls-creds-x509,id=tls0,dir={tmp_path / 'none'},endpoint=client",
              "--tls-creds", "tls0", "--tls-hostname", "localhost"]]
    server_tls = ["--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server",
                  "--tls-creds", "tls0"] if tls_server else []
    listed = 0
    for start in (start_qemu_nbd, start_cli):
        sock = str(tmp_path / f"{start.__name__}.sock")
        p = start(["-t", "-r", "-k", sock, "-x", "e1", *server_tls, image], sock)
        try:
            for args in cases:
                theirs = run(["qemu-nbd", "-L", "-k", sock, *args], check=False, timeout=60)
                ours = run_cli(capsys, "serve", "-L", "-k", sock, *args)
                assert ours == (theirs.returncode, theirs.stdout_text,
                                _as_ours(theirs.stderr_text)), args
                listed += "export: 'e1'" in ours[1]
        finally:
            stop_server(p)
    assert listed == 2      # once per server: over TLS to localhost, or plain without creds


def test_load_snapshot_serves_it_read_only(image, tmp_path):
    def copy(uri, _):
        out = tmp_path / "copy.raw"
        nbdcopy(uri, str(out))
        return out.read_bytes(), nbdinfo("--is", "readonly", uri, check=False).returncode
    theirs, ours = side_by_side(tmp_path, ["-t", "-l", "snap1"], image, copy)
    assert ours == theirs
    data, read_only = ours
    assert data[:MiB] == b"\x11" * MiB and read_only == 0


def test_snapshot_mode_writes_to_a_temporary_overlay(image, tmp_path, monkeypatch):
    """-s: the export is writable, the image is not changed, and the
    overlay (in $TMPDIR) is gone."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    before = open(image, "rb").read()

    def write_then_read(uri, _):
        qemu_io(uri, "write -P 0x33 64k 64k", fmt="raw")
        out = tmp_path / "copy.raw"
        nbdcopy(uri, str(out))
        return out.read_bytes()
    theirs, ours = side_by_side(tmp_path, ["-t", "-s"], image, write_then_read)
    assert ours == theirs
    assert ours[:64 << 10] == b"\x22" * (64 << 10) and ours[64 << 10:128 << 10] == \
        b"\x33" * (64 << 10)
    assert open(image, "rb").read() == before and os.listdir(tmp) == []

