"""``encrypt.format`` and the other ``encrypt.*`` choices as qemu-img 7.2
checks them: a bad value on create (named without ``encrypt.``), a
missing format, ``encrypt.format`` in --image-opts against the image's
header (before any secret), and amend's create-only options after the
image is open.  Each case: our status and message against qemu-img's."""

import pytest

import qcow2fast
from tests.helpers.cli_util import run_cli
from tests.helpers.luks_util import ITER_TIME, obj
from tests.helpers.qemu_util import qemu_img

PW = "hunter2"
MiB = 1 << 20


def qemu_result(*args):
    p = qemu_img(*args, check=False)
    return p.returncode != 0, p.stderr_text.strip().replace("qemu-img: ", "")


def ours_result(capsys, *args):
    status, _, err = run_cli(capsys, *args)
    return status != 0, err.strip().replace("qcow2fast: ", "")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("encfmt")
    paths = {"plain": d / "p.qcow2", "luks": d / "l.qcow2", "aes": d / "a.qcow2"}
    qcow2fast.create(paths["plain"], MiB)
    qcow2fast.create(paths["luks"], MiB, encrypt={"format": "luks", "key_secret": PW,
                                                  "iter_time": ITER_TIME})
    qcow2fast.create(paths["aes"], MiB, encrypt={"format": "aes", "key_secret": PW})
    return paths


@pytest.mark.parametrize("bad", ["encrypt.format=bogus", "encrypt.cipher-alg=foo",
                                 "encrypt.cipher-mode=foo", "encrypt.ivgen-alg=foo",
                                 "encrypt.hash-alg=foo", "encrypt.ivgen-hash-alg=foo",
                                 "encrypt.iter-time=10"])
def test_create_rejects_as_qemu(capsys, tmp_path, bad):
    # (the last: no encrypt.format at all; no secret either: the choices come first)
    extra = "" if bad.startswith("encrypt.format") or bad.startswith("encrypt.iter") \
        else "encrypt.format=luks,"
    def args(path):
        return ("create", "-q", "-f", "qcow2", "-o", extra + bad, str(path), "1M")
    failed, message = qemu_result(*args(tmp_path / "q.qcow2"))
    assert failed
    ours = tmp_path / "o.qcow2"
    assert ours_result(capsys, *args(ours)) == (True, message.replace("q.qcow2", "o.qcow2"))
    assert not ours.exists()

CASES = [  # (image, --image-opts extra, command)
    ("plain", "encrypt.format=luks", "info"),
    ("plain", "encrypt.format=bogus", "info"),
    ("luks", "encrypt.format=aes", "info"),
    ("luks", "encrypt.format=", "info"),
    ("luks", "encrypt.format=LUKS", "info"),
    ("aes", "encrypt.format=luks,encrypt.key-secret=sec0", "check"),
    ("luks", "encrypt.format=aes,encrypt.key-secret=sec0", "convert"),
    ("luks", "encrypt.format=luks,encrypt.key-secret=sec0", "convert"),
    ("aes", "encrypt.format=aes,encrypt.key-secret=sec0", "check"),
    ("luks", "encrypt.format=aes,encrypt.key-secret=sec0", "amend"),
]


@pytest.mark.parametrize("image,extra,command", CASES)
def test_image_opts_format_against_the_header(capsys, tmp_path, images, image, extra, command):
    spec = f"driver=qcow2,file.filename={images[image]},{extra}"
    tail = {"info": (), "check": (), "convert": ("-O", "raw", str(tmp_path / "out.raw")),
            "amend": ("-o", "encrypt.new-secret=sec0,encrypt.keyslot=1")}[command]
    args = (command, *obj(PW), "--image-opts", spec, *tail)
    if command == "amend":      # (amend writes: ours on a copy, the same name)
        args = (command, *obj(PW), *tail, "--image-opts", spec)
    want = qemu_result(*args)
    assert ours_result(capsys, *args) == want


def test_raw_driver_takes_no_encrypt_format(capsys, images):
    args = ("info", "--image-opts", f"driver=raw,file.filename={images['plain']},"
            "encrypt.format=luks")
    want = qemu_result(*args)
    assert want[0]
    assert ours_result(capsys, *args) == want


@pytest.mark.parametrize("option", ["encrypt.format=luks", "cluster_size=4k", "foo=1"])
@pytest.mark.parametrize("secret", [False, True])
def test_amend_opens_the_image_before_checking_options(capsys, images, option, secret):
    # qemu-img amend opens first: without the secret, the open's error wins
    spec = f"driver=qcow2,file.filename={images['luks']}" + \
        (",encrypt.key-secret=sec0" if secret else "")
    args = ("amend", *obj(PW), "-o", option, "--image-opts", spec)
    want = qemu_result(*args)
    assert want[0]
    assert ours_result(capsys, *args) == want


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """Plain tops over an encrypted base, one and two layers down."""
    d = tmp_path_factory.mktemp("encchain")
    base = d / "base.qcow2"
    qcow2fast.create(base, MiB, encrypt={"format": "luks", "key_secret": PW,
                                         "iter_time": ITER_TIME})
    qcow2fast.create(d / "top.qcow2", None, backing_file="base.qcow2", backing_format="qcow2")
    qcow2fast.create(d / "mid.qcow2", None, backing_file="base.qcow2", backing_format="qcow2")
    qcow2fast.create(d / "top2.qcow2", None, backing_file="mid.qcow2", backing_format="qcow2")
    return d


@pytest.mark.parametrize("top", ["top.qcow2", "top2.qcow2"])
@pytest.mark.parametrize("extra", [
    "backing.encrypt.format=luks,backing.encrypt.key-secret=sec0",
    "backing.encrypt.format=aes,backing.encrypt.key-secret=sec0",
    "backing.encrypt.key-secret=sec0", "backing.backing.encrypt.key-secret=sec0",
    "encrypt.key-secret=sec0",              # the image's secret is not its backing file's
    "encrypt.format=luks,backing.encrypt.key-secret=sec0",
])
@pytest.mark.parametrize("command", [["info"], ["check"], ["map"], ["convert", "-O", "raw"],
                                     ["commit"], ["rebase", "-u", "-b", "x.qcow2", "-F", "qcow2"],
                                     ["snapshot", "-l"]])
def test_backing_options_as_qemu(capsys, chains, top, extra, command):
    """backing.encrypt.format checked against that layer's header; the
    image's encrypt.key-secret not handed down; a backing.* option where
    the chain is not opened (info, rebase -u) refused, naming the option
    qemu names: status and message as qemu-img's."""
    line = [*command, *obj(PW), "--image-opts", f"driver=qcow2,file.filename={chains / top},"
            f"{extra}"]
    if command[0] == "convert":
        line.append(str(chains / "out.raw"))
    saved = (chains / top).read_bytes()
    want = qemu_result(*line)
    (chains / top).write_bytes(saved)
    assert ours_result(capsys, *line) == want
    (chains / top).write_bytes(saved)
