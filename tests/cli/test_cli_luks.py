"""The command line with encrypted images, side by side with qemu-img 7.2:
--object secret, encrypt.key-secret in --image-opts and -o, info, check,
map, compare, convert both ways, create's line, amend's key slots, and
qemu's messages for wrong or missing secrets and bad secret objects."""

import json

import pytest

import qcow2fast
from tests.helpers.cli_util import run_cli
from tests.helpers.luks_util import (ITER_TIME, luks_options, obj, opts, qemu_check_luks,
                                     qemu_create_luks, qemu_img_create_luks,
                                     qemu_compare_luks, qemu_io_luks)
from tests.helpers.qemu_util import qemu_img

PW = "hunter2"
MiB = 1 << 20


def qemu_err(*args):
    p = qemu_img(*args, check=False)
    assert p.returncode != 0
    return p.stderr_text.strip().removeprefix("qemu-img: ")


def ours_err(capsys, *args):
    status, _, err = run_cli(capsys, *args)
    assert status != 0
    return err.strip().removeprefix("qcow2fast: ")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "e.qcow2"
    qcow2fast.create(path, 4 * MiB, encrypt={"format": "luks", "key_secret": PW,
                                             "iter_time": ITER_TIME})
    qemu_io_luks(path, PW, "write -P 0x61 0 1M", "write -P 0x62 3M 4k")
    return path


def test_info_text_and_json_match_qemu(capsys, image):
    for fmt in ("human", "json"):
        status, out, _ = run_cli(capsys, "info", f"--output={fmt}", image)
        assert status == 0
        assert out == qemu_img("info", f"--output={fmt}", str(image)).stdout_text


def test_map_compare_check_with_secret(capsys, image, tmp_path):
    args = [*obj(PW), "--image-opts", opts(image)]
    status, out, _ = run_cli(capsys, "map", "--output=json", *args)
    assert status == 0
    assert json.loads(out) == json.loads(qemu_img("map", "--output=json", *args).stdout_text)
    status, out, _ = run_cli(capsys, "check", *args)
    assert status == 0 and "No errors were found" in out
    copy = tmp_path / "copy.qcow2"
    copy.write_bytes(image.read_bytes())
    status, out, _ = run_cli(capsys, "compare", *args, opts(copy))
    assert (status, out) == (0, "Images are identical.\n")


@pytest.mark.parametrize("case", ["wrong", "missing", "unknown-id"])
def test_open_errors_as_qemu(capsys, image, case):
    if case == "wrong":
        args = ["check", *obj("nope"), "--image-opts", opts(image)]
    elif case == "missing":
        args = ["check", str(image)]
    else:
        args = ["check", *obj(PW), "--image-opts", opts(image, oid="other")]
    before = image.read_bytes()
    assert ours_err(capsys, *args) == qemu_err(*args)
    assert image.read_bytes() == before


@pytest.mark.parametrize("spec", ["secret,id=s", "secret,id=s,data=a,file=/etc/hostname",
                                  "secret,id=s,data=%%%,format=base64",
                                  "secret,id=s,data=a,format=foo", "secret,id=s,data=a,foo=1"])
def test_secret_object_errors_as_qemu(capsys, image, spec):
    args = ["info", "--object", spec, str(image)]
    assert ours_err(capsys, *args) == qemu_err(*args)


def test_secret_file_and_base64(capsys, image, tmp_path):
    f = tmp_path / "pw"
    f.write_text(PW)
    import base64
    b64 = base64.b64encode(PW.encode()).decode()
    for spec in (f"secret,id=sec0,file={f}", f"secret,id=sec0,data={b64},format=base64"):
        status, out, err = run_cli(capsys, "check", "--object", spec, "--image-opts",
                                   opts(image))
        assert status == 0, err


def test_create_line_and_convert_both_ways(capsys, tmp_path):
    ours, theirs = tmp_path / "o.qcow2", tmp_path / "t.qcow2"
    o = luks_options(cipher_mode="cbc", ivgen_alg="essiv")
    status, out, _ = run_cli(capsys, "create", "-f", "qcow2", *obj(PW), "-o", o, ours, "1M")
    assert status == 0
    p = qemu_img_create_luks("-f", "qcow2", *obj(PW), "-o", o, str(theirs), "1M")
    assert p.returncode == 0, p.stderr_text
    ref = p.stdout_text
    assert out == ref.replace(str(theirs), str(ours))
    raw = tmp_path / "in.raw"
    raw.write_bytes(bytes(range(256)) * 4096)
    enc = tmp_path / "enc.qcow2"
    status, _, err = run_cli(capsys, "convert", *obj(PW), "-O", "qcow2", "-o",
                             luks_options(), raw, enc)
    assert status == 0, err
    qemu_compare_luks(enc, PW, raw)
    qemu_check_luks(enc, PW)
    back = tmp_path / "back.raw"
    status, _, err = run_cli(capsys, "convert", *obj(PW), "-O", "raw", "--image-opts",
                             opts(enc), back)
    assert status == 0, err
    assert back.read_bytes() == raw.read_bytes()


def test_amend_keyslots(capsys, image, tmp_path):
    new = "n3w-pass"
    two = [*obj(PW), *obj(new, "sec1")]
    args = ["amend", *two, "--image-opts", opts(image), "-o"]
    status, _, err = run_cli(capsys, *args, "encrypt.state=active,encrypt.new-secret=sec1,"
                             f"encrypt.keyslot=3,encrypt.iter-time={ITER_TIME}")
    assert status == 0, err
    slots = json.loads(qemu_img("info", "--output=json", str(image)).stdout_text)[
        "format-specific"]["data"]["encrypt"]["slots"]
    assert [s["active"] for s in slots] == [True, False, False, True] + [False] * 4
    # the same refusals as qemu, nothing written
    for o in ("encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=3",
              "encrypt.state=inactive", "encrypt.state=inactive,encrypt.keyslot=9",
              "encrypt.state=inactive,encrypt.new-secret=sec1",
              "encrypt.state=inactive,encrypt.keyslot=5", "encrypt.state=bogus"):
        before = image.read_bytes()
        assert ours_err(capsys, *args, o) == qemu_err(*args, o), o
        assert image.read_bytes() == before
    # erase the first passphrase's slot: only the new one opens it now
    status, _, err = run_cli(capsys, *args, "encrypt.state=inactive,encrypt.old-secret=sec0")
    assert status == 0, err
    qemu_check_luks(image, new)
    with pytest.raises(qcow2fast.Qcow2Error, match="Invalid password"):
        qcow2fast.open(image, key_secret=PW)
    with qcow2fast.open(image, key_secret=new) as img:
        assert img.read(0, 4) == b"aaaa"


def test_commit_and_rebase_encrypted_chain(capsys, tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    enc = {"format": "luks", "key_secret": PW, "iter_time": ITER_TIME}
    qcow2fast.create(base, MiB, encrypt=enc)
    qcow2fast.create(top, None, backing_file="base.qcow2", backing_format="qcow2", encrypt=enc)
    with qcow2fast.open(base, "r+", key_secret=PW) as img:
        img.write(0, b"\x01" * MiB)
    with qcow2fast.open(top, "r+", key_secret=PW) as img:
        img.write(4096, b"\x02" * 8192)
    expect = b"\x01" * 4096 + b"\x02" * 8192 + b"\x01" * (MiB - 12288)
    # as in qemu, the image's secret is not its backing file's
    line = ["commit", *obj(PW), "--image-opts", opts(top)]
    want = qemu_img(*line, check=False)
    status, out, err = run_cli(capsys, *line)
    assert (status, out) == (want.returncode, want.stdout.decode()) == (1, "")
    assert err.replace("qcow2fast: ", "qemu-img: ") == want.stderr.decode()
    status, out, err = run_cli(capsys, "commit", *obj(PW), "--image-opts",
                               opts(top, backing_oid="sec0"))
    assert (status, out) == (0, "Image committed.\n"), err
    qemu_check_luks(base, PW)
    with qcow2fast.open(base, key_secret=PW) as img:
        assert img.read(0, MiB) == expect
    with qcow2fast.open(top, key_secret=PW) as img:
        assert all(e.depth >= 1 for e in img.block_status(0, MiB))     # emptied
    # rebase onto an empty encrypted base: the top takes what differs
    other = tmp_path / "other.qcow2"
    qcow2fast.create(other, MiB, encrypt=enc)
    status, _, err = run_cli(capsys, "rebase", *obj(PW), "-b", "other.qcow2", "-F", "qcow2",
                             "--image-opts", opts(top, backing_oid="sec0"))
    assert status == 0, err
    with qcow2fast.open(top, key_secret=PW) as img:
        assert img.read(0, MiB) == expect
    qemu_check_luks(top, PW, backing_passphrase=PW)


def test_check_repair_all_of_a_dirty_encrypted_image(capsys, tmp_path):
    """check -r all (given the secret, as qemu-img wants it) rebuilds a dirty
    (lazy refcounts, killed writer) LUKS image's refcounts: the rebuild
    opened the image again without the key and failed with "Parameter
    'encrypt.key-secret' is required" (found by the LUKS crash states);
    it needs none, no guest data moves.  qemu then checks it clean."""
    path = tmp_path / "d.qcow2"
    qcow2fast.create(path, 4 * MiB, lazy_refcounts=True,
                     encrypt={"format": "luks", "key_secret": PW, "iter_time": ITER_TIME})
    with qcow2fast.open(path, "r+", key_secret=PW) as img:
        img.write(0, b"\x61" * 65536)
        img.flush()
        img.write(2 * MiB, b"\x62" * 4096)
        img.flush()
        assert img.dirty
        want = img.read(0, img.size)
        img.state.file.close()          # gone without close: the dirty bit stays on disk
        img.state.closed = True
    status, out, err = run_cli(capsys, "check", "-r", "all", *obj(PW), "--image-opts",
                               opts(path))
    assert status == 0, err
    qemu_check_luks(path, PW)
    with qcow2fast.open(path, key_secret=PW) as img:
        assert not img.dirty and img.read(0, img.size) == want


def test_convert_into_an_existing_encrypted_target_with_target_image_opts(capsys, tmp_path):
    """convert -n --target-image-opts ...,encrypt.key-secret=ID as qemu-img,
    both ways: into a target qemu made (qemu compares it with the source
    and checks it) and qemu into one we made (we read it); qemu's errors
    for a missing -n, -O with it, and a missing target secret."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"\0" * MiB + bytes(range(256)) * 4096 + b"\0" * MiB)
    made_by = {"qemu": tmp_path / "q.qcow2", "ours": tmp_path / "o.qcow2"}
    qemu_create_luks(made_by["qemu"], 3 * MiB, PW)
    qcow2fast.create(made_by["ours"], 3 * MiB, encrypt={"format": "luks", "key_secret": PW,
                                                        "iter_time": ITER_TIME})
    line = ["convert", *obj(PW), "-n", "--target-image-opts", str(src)]
    status, _, err = run_cli(capsys, *line, opts(made_by["qemu"]))
    assert status == 0, err
    qemu_compare_luks(made_by["qemu"], PW, src)
    qemu_check_luks(made_by["qemu"], PW)
    qemu_img(*line, opts(made_by["ours"]))
    with qcow2fast.open(made_by["ours"], key_secret=PW) as img:
        assert img.read(0, img.size) == src.read_bytes()
    target = opts(made_by["ours"])
    for bad in (["convert", *obj(PW), "--target-image-opts", str(src), target],
                ["convert", *obj(PW), "-n", "-O", "qcow2", "--target-image-opts", str(src),
                 target],
                ["convert", "-n", "--target-image-opts", str(src),
                 f"driver=qcow2,file.filename={made_by['ours']}"]):
        assert ours_err(capsys, *bad) == qemu_err(*bad)
