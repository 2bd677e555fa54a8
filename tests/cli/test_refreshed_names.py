"""The name ``info`` shows for an image opened by a json: name, as qemu
refreshes it (cli/refresh.py): the file's name, ``blkdebug:CONFIG:IMAGE``,
or ``json:`` and the node's strong options in qemu's key order -- side by
side with qemu-img 7.2, human and JSON output."""

import json

import pytest

from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import qemu_create, qemu_img

pytestmark = pytest.mark.qemu
MiB = 1 << 20


@pytest.fixture
def files(tmp_path):
    qemu_create(tmp_path / "base.qcow2", 64 * MiB)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             str(tmp_path / "top.qcow2"))
    (tmp_path / "disk.raw").write_bytes(bytes(MiB))
    (tmp_path / "rules.conf").write_text("")
    return tmp_path


def names(d):
    top = {"driver": "file", "filename": str(d / "top.qcow2")}
    raw = {"driver": "file", "filename": str(d / "disk.raw")}
    config = str(d / "rules.conf")
    return [
        {"driver": "qcow2", "file": top},                                   # the file's name
        {"file": top, "backing": None},                                     # probed; backing off
        {"driver": "qcow2", "file": top, "l2-cache-size": "1M"},            # weak option
        {"driver": "raw", "file": raw, "offset": 512},                      # strong: json:
        {"driver": "raw", "file": raw, "offset": 512, "size": 1024},
        {"driver": "raw", "file": {"driver": "null-co", "size": 4096}},
        {"driver": "qcow2", "file": {"driver": "blkdebug", "image": top}},
        {"driver": "qcow2", "file": {"driver": "blkdebug", "config": config, "image": top}},
        {"driver": "qcow2", "file": {"driver": "blkdebug", "image": top, "align": 512}},
        {"driver": "qcow2", "file": {"driver": "blkdebug", "image": top,
                                     "set-state": [{"event": "read_aio", "new_state": 42}]}},
        {"driver": "qcow2", "file": {"driver": "blkdebug", "image": top,
                                     "inject-error": [{"event": "l2_load", "once": True}]}},
        {"driver": "blkdebug", "config": 42, "image.driver": "null-co"},    # the format: blkdebug
        {"driver": "blkdebug", "image": raw},
    ]


@pytest.mark.parametrize("case", range(13))
def test_info_names_as_qemu(capsys, files, case, monkeypatch):
    monkeypatch.chdir(files)                # (config 42 names the file "42" here)
    (files / "42").write_text("")
    name = "json:" + json.dumps(names(files)[case])
    for output in ("human", "json"):
        want = qemu_img("info", f"--output={output}", name, check=False)
        status, out, err = cli(capsys, "info", f"--output={output}", name)
        assert (status, out) == (want.returncode, want.stdout_text), name
        if output == "human":
            assert out.startswith("image: ")
