"""A passphrase per layer of an encrypted backing chain, as qemu takes them
(``backing.encrypt.key-secret``, ``backing.backing.encrypt.key-secret`` in
--image-opts) and in Python (``key_secret={depth or file name: secret}``),
against qemu-img 7.2 on a chain of LUKS and legacy AES layers with three
passphrases."""

import pytest

import qcow2fast
from tests.helpers.cli_util import run_cli
from tests.helpers.luks_util import ITER_TIME, obj, qemu_create_luks, qemu_io_luks
from tests.helpers.qemu_util import qemu_img

MiB = 1 << 20
PWS = ("top-pass", "mid-aes-pass", "base-pass")
OBJECTS = [a for i, pw in enumerate(PWS) for a in obj(pw, f"s{i}")]


def chain_opts(path, ids=("s0", "s1", "s2")):
    """--image-opts of ``path`` with the secret ``ids[d]`` for the layer at depth d."""
    s = f"driver=qcow2,file.filename={path}"
    return s + "".join(f",{'backing.' * d}encrypt.key-secret={oid}" for d, oid in enumerate(ids))


def qemu_io_chain(path, ids, *cmds):
    from tests.helpers.qemu_util import QEMU_IO, run
    args = [QEMU_IO, *OBJECTS, "--image-opts", chain_opts(path, ids)]
    for c in cmds:
        args += ["-c", c]
    out = run(args).stdout_text
    assert "fail" not in out.lower(), out


def qemu_raw(path, tmp_path, ids=("s0", "s1", "s2")):
    out = tmp_path / "qemu.raw"
    qemu_img("convert", *OBJECTS, "-O", "raw", "--image-opts", chain_opts(path, ids), str(out))
    return out.read_bytes()


@pytest.fixture
def chain(tmp_path):
    """base (LUKS, PWS[2]) <- mid (legacy AES, PWS[1]) <- top (LUKS,
    PWS[0]), each written by qemu; their paths and the guest content."""
    base, mid, top = (tmp_path / f"{n}.qcow2" for n in ("base", "mid", "top"))
    qemu_create_luks(base, 4 * MiB, PWS[2])
    qemu_io_luks(base, PWS[2], "write -P 0x0b 0 4M")
    qemu_img("create", "-q", "-f", "qcow2", *obj(PWS[1]), "-o",
             "encrypt.format=aes,encrypt.key-secret=sec0", "-b", "base.qcow2", "-F", "qcow2",
             str(mid), "4M")
    qcow2fast.create(top, 4 * MiB, backing_file="mid.qcow2", backing_format="qcow2",
                     encrypt={"format": "luks", "key_secret": PWS[0], "iter_time": ITER_TIME})
    qemu_io_chain(mid, ("s1", "s2"), "write -P 0x6d 1M 100k")
    qemu_io_chain(top, ("s0", "s1", "s2"), "write -P 0x7a 3M 64k")
    want = bytearray(b"\x0b" * 4 * MiB)
    want[MiB:MiB + 100 * 1024] = b"\x6d" * (100 * 1024)
    want[3 * MiB:3 * MiB + 65536] = b"\x7a" * 65536
    return top, mid, base, want


def test_python_mapping_by_depth_and_by_name(chain, tmp_path):
    top, mid, base, want = chain
    assert qemu_raw(top, tmp_path) == want
    by_depth = dict(enumerate(PWS))
    by_name = {str(top): PWS[0], str(mid): PWS[1], str(base): PWS[2]}
    for secrets in (by_depth, by_name, {0: PWS[0], str(mid): PWS[1], 2: PWS[2]}):
        with qcow2fast.open(top, key_secret=secrets) as img:
            assert img.read(0, img.size) == want
            shown = repr(img) + repr(img.key_secret) + repr(vars(img))
            assert not any(pw in shown for pw in PWS)
    with qcow2fast.open(top, "r+", key_secret=by_depth) as img:
        img.write(MiB + 4096, b"\x99" * 1000)
    want[MiB + 4096:MiB + 5096] = b"\x99" * 1000
    assert qemu_raw(top, tmp_path) == want
    p = qemu_img("check", *OBJECTS, "--image-opts", chain_opts(top))
    assert "No errors were found" in p.stdout_text


@pytest.mark.parametrize("secrets,match", [
    ({0: PWS[0], 1: PWS[1]}, "encrypt.key-secret' is required"),     # the base has none
    ({0: PWS[0], 1: PWS[1], 2: "wrong"}, "Invalid password"),
    (PWS[0], "encrypt.key-secret' is required"),   # one for all: not for the AES layer
])
def test_missing_or_wrong_layer_secret(chain, secrets, match):
    top = chain[0]
    with pytest.raises(qcow2fast.Qcow2Error, match=match) as e:
        qcow2fast.open(top, key_secret=secrets)
    assert not any(pw in str(e.value) for pw in PWS)


def test_cli_backing_secrets_as_qemu(capsys, chain, tmp_path):
    """convert, compare and map with backing.encrypt.key-secret as qemu-img;
    without the base's secret both refuse."""
    top, _, _, want = chain
    out = tmp_path / "ours.raw"
    status, _, err = run_cli(capsys, "convert", *OBJECTS, "-O", "raw", "--image-opts",
                             chain_opts(top), out)
    assert status == 0, err
    assert out.read_bytes() == want
    for args in (["map", "--output=json"], ["compare"]):
        extra = [chain_opts(top)] if args[0] == "compare" else []
        line = [*args, *OBJECTS, "--image-opts", chain_opts(top), *extra]
        status, ours, err = run_cli(capsys, *line)
        assert status == 0, err
        assert ours == qemu_img(*line).stdout_text
    line = ["convert", *OBJECTS, "-O", "raw", "--image-opts", chain_opts(top, ("s0", "s1")),
            str(tmp_path / "x.raw")]
    p = qemu_img(*line, check=False)
    status, _, err = run_cli(capsys, *line)
    assert status != 0 and p.returncode != 0
    assert "Parameter 'encrypt.key-secret' is required for cipher" in p.stderr_text
    assert "Parameter 'encrypt.key-secret' is required for cipher" in err


def test_check_opens_the_chain_with_each_layer_secret(capsys, chain):
    """check as qemu-img: the whole chain is opened first, each layer with
    its secret; a missing or wrong one below fails with qemu's words
    ("Could not open backing file: ...", once per level)."""
    top, mid, _, _ = chain
    for ids in (("s0", "s1", "s2"), ("s0", "s1"), ("s0", "s1", "s0"), ("s0",), ("s1",),
                ("s0", "s2", "s2")):
        for path, layer_ids in ((top, ids), (mid, ids[1:])):
            line = ["check", *OBJECTS, "--image-opts", chain_opts(path, layer_ids)]
            p = qemu_img(*line, check=False)
            status, out, err = run_cli(capsys, *line)
            assert (status, out) == (p.returncode, p.stdout_text), line
            assert err.replace("qcow2fast: ", "") == p.stderr_text.replace("qemu-img: ", "")


def test_check_of_a_plain_top_over_an_encrypted_or_missing_base(capsys, chain, tmp_path):
    _, _, base, _ = chain
    plain = tmp_path / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(plain))
    missing = tmp_path / "missing.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
             str(missing), "4M")
    for line in (["check", str(plain)],
                 ["check", *OBJECTS, "--image-opts", chain_opts(plain, ("s1", "s2"))],
                 ["check", *OBJECTS, "--image-opts", chain_opts(plain, ("s1", "s1"))],
                 ["check", str(missing)]):
        p = qemu_img(*line, check=False)
        status, out, err = run_cli(capsys, *line)
        assert (status, out) == (p.returncode, p.stdout_text), err
        assert err.replace("qcow2fast: ", "") == p.stderr_text.replace("qemu-img: ", "")


def test_commit_with_the_chain_spelled_out_as_qemu_iotest_198(tmp_path, capsys):
    """qemu-iotests 198: commit --image-opts naming the backing layer's driver,
    file and secret (what the chain has: accepted; another file: refused),
    and info of a layer given its secret's id without the --object (qemu
    opens it for info without the secret), its json: name as qemu's."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_create_luks(base, 4 * MiB, PWS[2])
    qemu_io_luks(base, PWS[2], "write -P 0xa 0 4M")
    qemu_create_luks(top, 4 * MiB, PWS[0], extra=("-b", str(base), "-F", "qcow2"))
    spec = (f"driver=qcow2,file.filename={top},encrypt.key-secret=s0,backing.driver=qcow2,"
            f"backing.file.filename={base},backing.encrypt.key-secret=s2")
    qemu_io_luks(top, PWS[0], "write -P 9 0 3M", backing_passphrase=PWS[2])
    status, out, err = run_cli(capsys, "commit", *OBJECTS, "--image-opts", spec)
    assert (status, out, err) == (0, "Image committed.\n", "")
    qemu_io_luks(base, PWS[2], "read -P 9 0 3M", "read -P 0xa 3M 1M")
    other = spec.replace(f"backing.file.filename={base}", f"backing.file.filename={top}")
    status, _, err = run_cli(capsys, "commit", *OBJECTS, "--image-opts", other)
    assert status == 1 and "is not the image's backing file" in err
    for opts in (f"driver=qcow2,file.filename={base},encrypt.key-secret=s2",
                 f"driver=qcow2,file.filename={base}"):
        status, out, err = run_cli(capsys, "info", "--image-opts", opts)
        assert (status, out, err) == (0, qemu_img("info", "--image-opts", opts).stdout_text, "")
