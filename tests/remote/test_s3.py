"""Remote images in S3 (s3fs through fsspec) from moto's S3 emulator
started on localhost: qemu-made images read bit-exactly, a local top over
a base in a bucket, a changed object refused, and the command line (s3fs
configured from fsspec's environment variables)."""

import os
import subprocess
import sys

import pytest

import qcow2fast
from qcow2fast.host.remote import RemoteReadError
from tests.helpers.qemu_util import REPO, assert_bytes_equal, qemu_create, qemu_io, qemu_raw

MiB = 1 << 20
pytestmark = pytest.mark.qemu


def _upload(client, tmp_path, key, cmds=("write -P 0x11 0 3M", "write -P 0x22 6M 1M"),
            **opts):
    path = qemu_create(tmp_path / os.path.basename(key), "16M", **opts)
    qemu_io(path, *cmds)
    client.upload_file(path, "images", key)
    return path


def test_qemu_image_reads_bit_exactly(s3, tmp_path):
    client, options, _ = s3
    path = _upload(client, tmp_path, "golden/disk.qcow2", cluster_size=16384)
    with qcow2fast.open("s3://images/golden/disk.qcow2",
                        remote={"storage_options": options}) as img:
        assert img.path == "s3://images/golden/disk.qcow2"
        assert_bytes_equal(img.read(0, img.size), qemu_raw(path))
        assert img.file.reader.stats()["remote_requests"] <= 8


def test_local_top_over_s3_base(s3, tmp_path):
    client, options, _ = s3
    base = _upload(client, tmp_path, "golden/base.qcow2")
    top = qemu_create(tmp_path / "top.qcow2", "16M")
    # qemu cannot open s3:// itself: the name is written with -u (unsafe).
    from tests.helpers.qemu_util import qemu_img
    qemu_img("rebase", "-u", "-b", "s3://images/golden/base.qcow2", "-F", "qcow2", top)
    twin = qemu_create(tmp_path / "twin.qcow2", None, backing=base, backing_fmt="qcow2")
    remote = {"storage_options": options}
    with qcow2fast.open(top, "r+", remote=remote) as img:
        assert img.backing.path == "s3://images/golden/base.qcow2"
        img.write(MiB + 512, b"\x5a" * 100000)
    qemu_io(twin, f"write -P 0x5a {MiB + 512} 100000")
    with qcow2fast.open(top, remote=remote) as img:
        assert_bytes_equal(img.read(0, img.size), qemu_raw(twin))
    got = client.get_object(Bucket="images", Key="golden/base.qcow2")["Body"].read()
    assert got == open(base, "rb").read()                    # the base was not written


def test_changed_object_is_refused(s3, tmp_path):
    client, options, _ = s3
    _upload(client, tmp_path, "golden/moving.qcow2")
    with qcow2fast.open("s3://images/golden/moving.qcow2",
                        remote={"storage_options": options, "block_size": 65536}) as img:
        img.read(0, 4096)
        client.put_object(Bucket="images", Key="golden/moving.qcow2", Body=b"\0" * 4096)
        with pytest.raises(RemoteReadError, match="object changed since it was opened") as e:
            img.read(6 * MiB, 4096)
        assert e.value.filename == "s3://images/golden/moving.qcow2"


def test_cli_on_s3(s3, tmp_path):
    client, _, endpoint = s3
    path = _upload(client, tmp_path, "golden/cli.qcow2")
    env = {**os.environ, "PYTHONPATH": REPO, "FSSPEC_S3_ENDPOINT_URL": endpoint,
           "FSSPEC_S3_KEY": "testing", "FSSPEC_S3_SECRET": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    out = tmp_path / "out.raw"
    p = subprocess.run([sys.executable, "-m", "qcow2fast", "convert", "-O", "raw",
                        "s3://images/golden/cli.qcow2", str(out)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == qemu_raw(path)
