"""qcow2fast measure against qemu-img 7.2: the same numbers and output."""

import pytest

import qcow2fast
from qcow2fast.cli import main
from tests.helpers.qemu_util import qemu_create, qemu_img, qemu_io

pytestmark = pytest.mark.qemu
MiB = 1 << 20


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("measure")
    out = {}
    out["sparse"] = qemu_create(d / "sparse.qcow2", 64 * MiB)
    qemu_io(out["sparse"], "write -P 1 0 1M", "write -P 2 10M 100k", "write -z 20M 1M",
            "write -c -P 3 30M 64k")
    out["chain"] = str(d / "top.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "sparse.qcow2", "-F", "qcow2", out["chain"], "80M")
    qemu_io(out["chain"], "write -P 4 70M 8k")
    out["qf"] = str(d / "qf.qcow2")                 # written by qcow2fast: host holes
    qcow2fast.create(out["qf"], 16 * MiB, cluster_size=65536)
    with qcow2fast.open(out["qf"], "r+") as img:
        for i in range(40):
            img.write(i * 300_000, b"q" * 5000)
    raw = d / "r.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        for off in (0, 3 * MiB + 4096, 7 * MiB):
            f.seek(off)
            f.write(b"r" * 20000)
    out["raw"] = str(raw)
    out["snap"] = qemu_create(d / "snap.qcow2", 32 * MiB)   # snapshot, then grown and rewritten
    qemu_io(out["snap"], "write -P 5 0 3M", "write -z 8M 1M")
    qemu_img("snapshot", "-c", "before", out["snap"])
    qemu_img("resize", out["snap"], "48M")
    qemu_io(out["snap"], "write -P 6 2M 20M", "discard 0 1M")
    return out


@pytest.mark.parametrize("which", ["sparse", "chain", "qf", "raw"])
@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4k"],
                                  ["-o", "cluster_size=512,refcount_bits=1"],
                                  ["-o", "cluster_size=2M,refcount_bits=64"],
                                  ["-o", "compat=0.10"], ["-o", "preallocation=falloc"]])
def test_measure_image_equals_qemu(capsys, sources, which, opts):
    fmt = ["-f", "raw"] if which == "raw" else []
    argv = ["measure", "--output=json", "-O", "qcow2", *opts, *fmt, sources[which]]
    status = main(argv)
    out = capsys.readouterr().out
    assert status == 0
    assert out.strip() == qemu_img(*argv).stdout_text.strip()


@pytest.mark.parametrize("which", ["before", "1", "snapshot.name=before",
                                   "snapshot.id=1,snapshot.name=before"])
@pytest.mark.parametrize("out_fmt", ["qcow2", "raw"])
def test_measure_snapshot_equals_qemu(capsys, sources, which, out_fmt):
    argv = ["measure", "--output=json", "-O", out_fmt, "-l", which, sources["snap"]]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == qemu_img(*argv).stdout_text.strip()


@pytest.mark.parametrize("which", ["nope", "snapshot.id=2", "snapshot.size=1"])
def test_measure_snapshot_errors(capsys, sources, which):
    assert main(["measure", "-O", "qcow2", "-l", which, sources["snap"]]) == 1
    assert capsys.readouterr().err.startswith("qcow2fast: ")
    assert main(["measure", "-O", "qcow2", "-l", "x", "-f", "raw", sources["raw"]]) == 1
    assert "snapshot" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--size", "1G", "-O", "qcow2"], ["--output=json", "--size", "1.5T", "-O", "qcow2"],
    ["--output=json", "--size", "100M", "-O", "qcow2", "-o", "preallocation=full"],
    ["--output=json", "--size", "5G", "-O", "qcow2", "-o", "cluster_size=512,refcount_bits=64"],
    ["--output=json", "--size", "1000", "-O", "raw"],
])
def test_measure_size_equals_qemu(capsys, argv):
    status = main(["measure", *argv])
    assert status == 0
    assert capsys.readouterr().out == qemu_img("measure", *argv).stdout_text


@pytest.mark.parametrize("argv", [["measure"], ["measure", "--size", "1G", "x.qcow2"],
                                  ["measure", "--size", "1G", "-O", "vmdk"]])
def test_measure_usage_errors(capsys, argv):
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith("qcow2fast: ")


@pytest.mark.parametrize("argv", [["--size", "1025T", "-O", "qcow2", "-o", "extended_l2=on"],
                                  ["--size", "9P", "-O", "qcow2"]])
def test_measure_too_large_as_qemu(capsys, argv):
    """qemu-img measure's own words (create's name the format)."""
    want = qemu_img("measure", *argv, check=False)
    assert main(["measure", *argv]) == want.returncode == 1
    assert capsys.readouterr().err.split(": ", 1)[1] == want.stderr_text.split(": ", 1)[1]
