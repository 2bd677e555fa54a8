"""``json:`` names as backing files (qemu-iotests backing-file-invalidation):
a qcow2 or raw node over a file node, or a file node, kept in the header as
written and opened as the file it names; compared with qemu-img 7.2."""

import json
import struct

import pytest

import qcow2fast
from qcow2fast.engine.backing import json_file
from qcow2fast.errors import UnsupportedFeatureError
from qcow2fast.spec import header as hdr
from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import (patch_bytes, qemu_check, qemu_create, qemu_img, qemu_info,
                                     qemu_io)

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def node(path, fmt="qcow2"):
    return "json:" + json.dumps({"driver": fmt, "file": {"driver": "file",
                                                         "filename": str(path)}})


@pytest.mark.parametrize("name,want", [
    ('json:{"driver":"qcow2","file":{"driver":"file","filename":"/a"}}', ("/a", "qcow2")),
    ('json:{"driver":"raw","file":{"filename":"a"}}', ("a", "raw")),
    ('json:{"file.driver":"file","file.filename":"a"}', ("a", None)),
    ('json:{"driver":"file","filename":"a"}', ("a", None)),
    ('json:{"driver":"null-co"}', None),
    ('json:{"driver":"qcow2","file":{"driver":"nbd","path":"s"}}', None),
    ('json:{"driver":"qcow2","file":{"filename":"a","aio":"native"}}', None),
    ('json:{"driver":"qcow2","file":"node0"}', None),
    ('json:{"driver":', None),
    # qemu's JSON also takes single-quoted strings (qemu-iotests 110)
    ("json:{'driver':'qcow2','file':{'driver':'file','filename':'a'}}", ("a", "qcow2")),
    ("json:{'driver':'raw','file':{'filename':'it\\'s \"b\"'}}", ("it's \"b\"", "raw")),
    ("json:{\"driver\":\"raw\",\"file\":{\"filename\":\"x'y\"}}", ("x'y", "raw")),
    ("json:{'driver':'raw','file':{'filename':'a}}", None),
])
def test_json_file_takes_only_plain_trees(name, want):
    assert json_file(name) == want


def test_chain_of_json_backing_names_as_qemu(capsys, tmp_path):
    """Three layers, each naming the one below with a json: name: created
    by qcow2fast, checked clean and read by qemu; info --backing-chain prints
    what qemu-img prints (the json: names as written, each layer's file)."""
    imgs = [tmp_path / f"i{k}.qcow2" for k in range(4)]
    qemu_create(imgs[0], MiB)
    qemu_io(imgs[0], "write -P 7 64k 64k")
    for k in (1, 2):
        status, _, _ = cli(capsys, "create", "-f", "qcow2", "-F", "qcow2", "-b",
                           node(imgs[k - 1]), imgs[k], str(MiB))
        assert status == 0
        qemu_check(imgs[k])
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", imgs[2], imgs[3])
    for fmt in ("json", "human"):
        status, out, err = cli(capsys, "info", "--backing-chain", f"--output={fmt}", imgs[3])
        q = qemu_img("info", "--backing-chain", f"--output={fmt}", imgs[3])
        assert (status, out, err) == (0, q.stdout_text, "")
    qemu_io(imgs[3], "read -P 7 64k 64k")
    with qcow2fast.open(str(imgs[3])) as img:
        assert img.read(64 << 10, 64 << 10) == b"\x07" * (64 << 10)


def test_json_backing_name_gives_the_format(tmp_path):
    """A json: backing name without a backing format in the header: its
    driver is the format (a raw base is not probed)."""
    base, top = tmp_path / "b.raw", tmp_path / "t.qcow2"
    base.write_bytes(b"QFI\xfb" + bytes(MiB - 4))        # qcow2's magic, but raw
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", node(base, "raw"), top,
             str(MiB))
    head = top.read_bytes()[:4096]      # the backing format extension made unknown (ignored)
    at = head.index(struct.pack(">I", hdr.EXT_BACKING_FORMAT))
    patch_bytes(top, at, struct.pack(">I", 0x7e57e57))
    assert "backing-filename-format" not in qemu_info(top)
    with qcow2fast.open(str(top)) as img:
        assert img.read(0, 4) == b"QFI\xfb"
    qemu_io(top, "read -P 0 4 64k", extra=("-r",))


def test_json_backing_with_other_drivers_is_refused(tmp_path):
    top = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b",
             'json:{"driver":"null-co","size":1048576}', top, str(MiB))
    with pytest.raises(UnsupportedFeatureError, match="protocols are not supported"):
        qcow2fast.open(str(top))


def test_info_of_a_single_quoted_json_name_as_qemu(capsys, tmp_path):
    """qemu-iotests 110's first name: qemu's JSON with single quotes."""
    path = qemu_create(tmp_path / "q.qcow2", MiB)
    name = f"json:{{'driver':'qcow2','file':{{'driver':'file','filename':'{path}'}}}}"
    status, out, err = cli(capsys, "info", name)
    assert (status, out, err) == (0, qemu_img("info", name).stdout_text, "")
