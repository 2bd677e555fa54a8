"""convert -c through Image: compressed output with extended L2 entries and
either compression type, into an existing target (-n, also with
--target-is-zero), and from the command line (-c -n)."""

import pytest

import qcow2fast
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import (Rng, assert_compressed, assert_plain, compressible_bytes,
                                     qemu_check, qemu_compare, qemu_create, qemu_img, qemu_io)

pytestmark = pytest.mark.qemu
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A raw source: compressible, random and zero MiBs, and a partial tail."""
    d = tmp_path_factory.mktemp("cwconvert")
    rng = Rng("cw-source")
    data = (compressible_bytes(rng, MiB) + rng.randbytes(MiB) + bytes(MiB)
            + compressible_bytes(rng, 1000))
    path = d / "src.raw"
    path.write_bytes(data)
    return str(path), data


def assert_converted(out, data):
    qemu_check(out)
    qemu_compare(out, data + bytes(-len(data) % 512))
    assert_compressed(out, 0)
    assert_plain(out, MiB)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_convert_compressed_extended_l2(tmp_path, source, ctype):
    src, data = source
    out = tmp_path / "x.qcow2"
    qcow2fast.convert(src, out, compress=True,
                      options={"extended_l2": True, "cluster_size": 64 * KiB,
                               "compression_type": ctype})
    assert_converted(out, data)


@pytest.mark.parametrize("target", ["empty", "full", "zero"])
def test_convert_compressed_into_existing_target(tmp_path, source, target):
    """-c -n: into an empty target, into one full of data (those clusters
    are discarded first: compressed clusters need free space), and with
    --target-is-zero."""
    src, data = source
    out = str(tmp_path / "n.qcow2")
    qemu_create(out, 4 * MiB, cluster_size=64 * KiB)
    if target == "full":
        qemu_io(out, "write -P 0xee 0 4M")
    qcow2fast.convert(src, out, existing=True, compress=True, compression_level=9,
                      target_is_zero=target == "zero")
    qemu_check(out)
    # (the source is sized in whole sectors, as qemu sizes it: its last one
    # ends in zeros, which are written too, as qemu-img convert -n writes them)
    pad = -len(data) % 512
    want = data + bytes(pad) + (b"\xee" if target == "full" else b"\0") * (
        4 * MiB - len(data) - pad)
    qemu_compare(out, want)
    assert_compressed(out, 0)
    assert_plain(out, MiB)
    # The source ends inside the cluster at 3 MiB and the target goes on:
    # unless the target is known to be zero, the target's bytes past the
    # source's end are kept (the source's are written uncompressed).
    (assert_compressed if target == "zero" else assert_plain)(out, 3 * MiB)


def test_convert_cli_c_n(capsys, tmp_path, source):
    src, data = source
    out = str(tmp_path / "cli.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", out,
             str(len(data) + (-len(data) % 512)))
    status, _, err = run_cli(capsys, "convert", "-c", "-n", "-O", "qcow2", src, out)
    assert status == 0, err
    assert_converted(out, data)
