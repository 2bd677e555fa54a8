"""``create -f luks``: a raw LUKS volume (qemu's luks format), as qemu-img
7.2 makes it: the same lines, messages and file; qemu opens it with the
passphrase.  qemu-iotests gate every LUKS test on it (_require_working_luks)."""

import os

import pytest

from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import QEMU_IO, qemu_img, run

pytestmark = pytest.mark.qemu
SECRET = "secret,id=sec0,data=hunter0"


@pytest.mark.parametrize("opts", [
    ["-o", "key-secret=sec0", "-o", "iter-time=10", "F", "1M"],
    ["-o", "preallocation=off,iter-time=10,hash-alg=sha256,ivgen-hash-alg=sha256,"
     "ivgen-alg=essiv,cipher-mode=cbc,cipher-alg=aes-128,key-secret=sec0", "F", "1M"],
    ["-q", "-o", "key-secret=sec0,iter-time=10,size=2M", "F"],
    ["-o", "key-secret=sec0,iter-time=10,foo=1", "F", "1M"],
    ["-o", "key-secret=sec0,iter-time=10", "-b", "x", "F", "1M"],
    ["-o", "key-secret=sec1,iter-time=10", "F", "1M"],
    ["-o", "key-secret=sec0,iter-time=10,cipher-alg=foo", "F", "1M"],
    ["-o", "key-secret=sec0,iter-time=10", "F"],
    ["-o", "iter-time=10", "F", "1M"],
    ["-o", "help"],
])
def test_create_luks_as_qemu(capsys, tmp_path, opts):
    """Same status, output and messages as qemu-img; the volume made has
    qemu's size (header, key material, payload offset) and opens in qemu."""
    ours, theirs = tmp_path / "o.luks", tmp_path / "q.luks"
    args = ["create", "-f", "luks", "--object", SECRET]
    status, out, err = cli(capsys, *args, *[str(ours) if a == "F" else a for a in opts])
    q = qemu_img(*args, *[str(theirs) if a == "F" else a for a in opts], check=False)
    err = err.replace("qcow2fast: ", "qemu-img: ")
    assert (status, out.replace(str(ours), str(theirs)), err.replace(str(ours), str(theirs))) \
        == (q.returncode, q.stdout_text, q.stderr_text)
    assert ours.exists() == (status == 0 and "help" not in opts)
    if ours.exists():
        assert os.path.getsize(ours) == os.path.getsize(theirs)
        spec = f"driver=luks,key-secret=sec0,file.filename={ours}"
        p = run([QEMU_IO, "--object", SECRET, "--image-opts", spec,
                 "-c", "write -P 5 0 64k", "-c", "read -P 5 0 64k"])
        assert "Pattern verification failed" not in p.stdout_text
        assert '"format": "luks"' in qemu_img("info", "--output=json", ours).stdout_text


def test_luks_volume_refuses_another_passphrase(capsys, tmp_path):
    vol = tmp_path / "v.luks"
    assert cli(capsys, "create", "-q", "-f", "luks", "--object", SECRET, "-o",
               "key-secret=sec0,iter-time=10", str(vol), "1M")[0] == 0
    p = run([QEMU_IO, "--object", "secret,id=s,data=other", "--image-opts",
             f"driver=luks,key-secret=s,file.filename={vol}", "-c", "read 0 512"], check=False)
    assert p.returncode != 0 and "Invalid password" in p.stderr_text


def test_create_over_an_encrypted_backing_takes_its_size_without_its_secret(capsys, tmp_path):
    """qemu-iotests 189: qemu-img opens the backing file only for its size,
    which needs no passphrase."""
    base, top = tmp_path / "b.qcow2", tmp_path / "t.qcow2"
    assert cli(capsys, "create", "-q", "-f", "qcow2", "--object", SECRET, "-o",
               "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", str(base),
               "16M")[0] == 0
    status, out, err = cli(capsys, "create", "-f", "qcow2", "--object",
                           "secret,id=sec1,data=other", "-o", "encrypt.format=luks,"
                           "encrypt.key-secret=sec1,encrypt.iter-time=10", "-b", str(base),
                           "-F", "qcow2", str(top))
    assert (status, err) == (0, "") and "size=16777216" in out
    assert '"virtual-size": 16777216' in qemu_img("info", "--output=json", top).stdout_text


@pytest.mark.parametrize("choice", ["", ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv"])
@pytest.mark.parametrize("info", [[], ["--output=json"], ["-f", "luks"],
                                  ["--backing-chain", "--output=json"]])
def test_info_of_a_luks_volume_as_qemu(capsys, tmp_path, choice, info):
    """The volume's header (format luks, payload size, slots), as qemu-img
    info prints it, without the passphrase."""
    vol = tmp_path / "v.luks"
    assert cli(capsys, "create", "-q", "-f", "luks", "--object", SECRET, "-o",
               "key-secret=sec0,iter-time=10" + choice, str(vol), "3M")[0] == 0
    status, out, err = cli(capsys, "info", *info, str(vol))
    assert (status, out, err) == (0, qemu_img("info", *info, vol).stdout_text, "")


def test_info_of_a_truncated_luks_header_is_an_error(capsys, tmp_path):
    vol = tmp_path / "v.luks"
    vol.write_bytes(b"LUKS\xba\xbe" + bytes(294))
    status, _, err = cli(capsys, "info", str(vol))
    assert status == 1 and "LUKS header: truncated: 300 bytes" in err
