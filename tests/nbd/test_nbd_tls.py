"""TLS as qemu-nbd does it (``--object tls-creds-x509,...,endpoint=server
--tls-creds ID``): libnbd's TLS clients (nbdinfo, nbdcopy with nbds+unix://
and tls-certificates=DIR) get the data; plain connections, and clients
without a certificate the CA signed, are refused with qemu-nbd's replies
(compared option by option with qemu-nbd 7.2)."""

import json
import os
import ssl
import time

import pytest

from qcow2fast.nbd import protocol as P

from tests.helpers.nbd_util import (RawClient, nbdcopy, nbdinfo, start_cli, start_qemu_nbd,
                                    stop_server)
from tests.helpers.qemu_util import MiB, qemu_create, qemu_img, qemu_io
from tests.helpers.tls_util import make_certificates

pytestmark = pytest.mark.qemu


@pytest.fixture
def pki(tmp_path):
    return make_certificates(tmp_path / "pki")


@pytest.fixture
def image(tmp_path, qemu):
    path = qemu_create(tmp_path / "t.qcow2", 4 * MiB)
    qemu_io(path, "write -P 0x3c 64k 1M")
    return path


def tls_args(pki):
    return ["--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server",
            "--tls-creds", "tls0"]


def tls_uri(sock, pki):
    return f"nbds+unix:///?socket={sock}&tls-certificates={pki}"


def test_libnbd_clients_over_tls(image, pki, tmp_path):
    sock = str(tmp_path / "tls.sock")
    p = start_cli(["-t", "-r", "-k", sock, *tls_args(pki), image], sock)
    try:
        out = nbdinfo(tls_uri(sock, pki)).stdout_text
        assert "with TLS" in out
        copy = tmp_path / "copy.raw"
        nbdcopy(tls_uri(sock, pki), str(copy))
        expected = tmp_path / "expected.raw"
        qemu_img("convert", "-O", "raw", image, expected)
        assert copy.read_bytes() == expected.read_bytes()
        # Refused: a plain client, and a TLS client without a client certificate.
        assert nbdinfo(f"nbd+unix:///?socket={sock}", check=False).returncode != 0
        no_cert = make_certificates(tmp_path / "other", client=False)
        (no_cert / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
        assert nbdinfo(tls_uri(sock, no_cert), check=False).returncode != 0
    finally:
        assert stop_server(p) == 0


def _answers(sock, pki):
    """Option replies before TLS (each on a new connection), then after
    STARTTLS on a TLS socket; for a server without TLS, its STARTTLS replies."""
    out = []
    before = [(P.NBD_OPT_STARTTLS, b"x")]
    if pki is not None:
        before += [(P.NBD_OPT_LIST, b""), (P.NBD_OPT_GO, RawClient.go_data("")),
                   (P.NBD_OPT_STRUCTURED_REPLY, b""), (P.NBD_OPT_ABORT, b"")]
    for option, data in before:
        c = RawClient(sock)
        out.append(c.option(option, data))
        c.close()
    c = RawClient(sock)
    out.append(c.option(P.NBD_OPT_STARTTLS))
    if pki is not None:
        ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
        ctx.load_cert_chain(pki / "client-cert.pem", pki / "client-key.pem")
        c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
        out.append(c.option(P.NBD_OPT_STARTTLS))
        out.append([t for t, _ in c.option(P.NBD_OPT_GO, c.go_data(""))])
        c.disconnect()
        c = RawClient(sock)             # NBD_OPT_EXPORT_NAME before TLS: dropped
        c.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_EXPORT_NAME, 0))
        out.append(c.at_eof())
    c.close()
    return out


@pytest.mark.parametrize("tls", [True, False], ids=["tls-required", "no-tls"])
def test_option_replies_as_qemu_nbd(image, pki, tmp_path, tls):
    answers = []
    for name, start in (("qemu", start_qemu_nbd), ("ours", start_cli)):
        sock = str(tmp_path / f"{name}.sock")
        p = start(["-t", "-r", "-k", sock, *(tls_args(pki) if tls else []), image], sock)
        try:
            answers.append(_answers(sock, pki if tls else None))
        finally:
            stop_server(p)
    theirs, ours = answers
    assert ours == theirs
    refused = (P.NBD_REP_ERR_TLS_REQD, b"Option 0x3 not permitted before TLS")
    assert (theirs[1] == [refused]) if tls else theirs[-1][0][0] == P.NBD_REP_ERR_POLICY


CLIENT_DN = "O=qcow2fast tests,CN=qcow2fast test client"     # (tls_util's client)
AUTHZ = [
    ("authz-simple,id=a,identity=" + CLIENT_DN.replace(",", ",,"), True),
    ("authz-simple,id=a,identity=CN=qcow2fast test client", False),
    ("authz-list,id=a,policy=deny,rules.0.match=O=*,rules.0.policy=allow,rules.0.format=glob",
     True),
    ("authz-list,id=a,policy=allow,rules.0.match=*test client,rules.0.policy=deny,"
     "rules.0.format=glob", False),
    ("authz-list,id=a,policy=allow,rules.0.match=" + CLIENT_DN.replace(",", ",,")
     + ",rules.0.policy=deny", False),
    ("authz-list,id=a,policy=allow", True),
    ("authz-list,id=a", False),
]


@pytest.mark.parametrize("authz,allowed", AUTHZ, ids=lambda a: str(a)[:50])
def test_tls_authz_as_qemu_nbd(image, pki, tmp_path, authz, allowed):
    """--tls-authz: the client certificate's name (as GnuTLS writes it)
    checked by qemu's authz objects; the same clients get in as with qemu-nbd."""
    outcomes = []
    for name, start in (("qemu", start_qemu_nbd), ("ours", start_cli)):
        sock = str(tmp_path / f"{name}.sock")
        p = start(["-t", "-r", "-k", sock, *tls_args(pki), "--object", authz,
                   "--tls-authz", "a", image], sock)
        try:
            outcomes.append(nbdinfo("--size", tls_uri(sock, pki), check=False).returncode == 0)
        finally:
            stop_server(p)
        if name == "ours" and not allowed:
            assert f"TLS x509 authz check for {CLIENT_DN} is denied" in p.stderr.read().decode()
    assert outcomes == [allowed, allowed]


def test_tls_authz_listfile_read_again_when_changed(image, pki, tmp_path):
    """authz-listfile (qemu's; Debian's qemu-nbd 7.2 is built without it):
    the JSON list, read again when the file changes; a bad file lets
    nobody in until it is right again."""
    rules = tmp_path / "rules.json"

    def write(policy, **extra):
        text = json.dumps({"policy": "deny", "rules": [
            {"match": "O=qcow2fast tests,CN=*", "policy": policy, "format": "glob"}]})
        rules.write_text(extra.get("text", text))
        os.utime(rules, ns=(time.time_ns(), time.time_ns() + extra.get("bump", 0)))
    write("allow")
    sock = str(tmp_path / "l.sock")
    p = start_cli(["-t", "-r", "-k", sock, *tls_args(pki), "--object",
                   f"authz-listfile,id=a,filename={rules}", "--tls-authz", "a", image], sock)
    try:
        assert nbdinfo("--size", tls_uri(sock, pki), check=False).returncode == 0
        write("deny", bump=10 ** 9)
        assert nbdinfo("--size", tls_uri(sock, pki), check=False).returncode != 0
        write(None, text="{not json", bump=2 * 10 ** 9)
        assert nbdinfo("--size", tls_uri(sock, pki), check=False).returncode != 0
        write("allow", bump=3 * 10 ** 9)
        assert nbdinfo("--size", tls_uri(sock, pki), check=False).returncode == 0
    finally:
        stop_server(p)


def test_tls_authz_errors(image, pki, tmp_path, capsys):
    from tests.helpers.cli_util import run_cli
    sock = str(tmp_path / "e.sock")
    for extra, message in (
            (["--tls-authz", "nope"], "Cannot find QAuthZ object ID nope"),
            (["--object", "authz-pam,id=a,service=x", "--tls-authz", "a"],
             "invalid object type: authz-pam"),
            (["--object", "authz-list,id=a,rules.0.match=x", "--tls-authz", "a"],
             "Parameter 'rules.0.policy' is missing"),
            (["--object", "authz-list,id=a,policy=maybe", "--tls-authz", "a"],
             "Parameter 'policy' does not accept value 'maybe'"),
            (["--object", f"authz-listfile,id=a,filename={tmp_path}/none.json",
              "--tls-authz", "a"], "Unable to read")):
        status, _, err = run_cli(capsys, "serve", "-k", sock, *tls_args(pki), *extra, image)
        assert status == 1 and message in err, (extra, err)
