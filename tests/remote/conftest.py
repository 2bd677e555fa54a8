"""Servers for the remote-image tests, started on localhost by the tests:
an HTTP server with Range support (tests/helpers/http_server.py) and an
S3 emulator (moto's server mode)."""

import pytest

from tests.helpers.http_server import RangeServer

S3_KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
           "region_name": "us-east-1"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, directory it serves): files written there are at server.url/NAME."""
    root = tmp_path_factory.mktemp("served")
    with RangeServer(root) as server:
        yield server, root


@pytest.fixture
def http(served):
    server, root = served
    server.misbehave(None)
    server.head_allowed = True
    server.reset_counts()
    return server, root


@pytest.fixture(scope="module")
def s3():
    """(boto3 client, storage options for s3fs, endpoint URL) of a moto
    server with a bucket ``images``."""
    import boto3
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, **S3_KEYS)
        client.create_bucket(Bucket="images")
        options = {"key": S3_KEYS["aws_access_key_id"],
                   "secret": S3_KEYS["aws_secret_access_key"],
                   "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        yield client, options, endpoint
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An OpenSSH server on localhost (tests/helpers/sshd_util.py): files
    in ``sshd.root`` are at ``sshd.url(NAME)``; clients authenticate in
    ``sshd.env``."""
    from tests.helpers.qemu_util import require
    from tests.helpers.sshd_util import HAVE_SSHD, SshServer
    require(HAVE_SSHD, "sshd/ssh-agent not installed (Debian packages openssh-server, "
                       "openssh-client)")
    with SshServer(tmp_path_factory.mktemp("ssh")) as server:
        yield server
