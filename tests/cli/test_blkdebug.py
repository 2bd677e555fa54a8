"""qemu's blkdebug error-injection driver (host/blkdebug.py): its rules'
semantics, and each place it sits -- under the qcow2 engine (``blkdebug:
RULES:IMAGE``, a json: ``file``/``data-file`` child, a json: backing name),
announced events arming it (read_aio, write_aio, cluster_free), and above
a format node (json:/--image-opts ``image``) -- run side by side with
qemu-img 7.2 on copies of the same image: same exit status, same output,
and images qemu-img then checks the same."""

import shutil

import pytest

from qcow2fast.errors import InvalidArgumentError
from qcow2fast.host import blkdebug
from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import qemu_img, qemu_io

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def as_qemu(text):
    return text.replace("qcow2fast: ", "qemu-img: ")


def both(capsys, argv, ours=None):
    """qemu-img with ``argv``, qcow2fast with ``ours`` (default the same):
    (status, stdout, stderr) of each, qemu-img's first."""
    want = qemu_img(*argv, check=False)
    status, out, err = cli(capsys, *(ours or argv))
    return (want.returncode, want.stdout_text, want.stderr_text), (status, out, as_qemu(err))


def rules_file(tmp_path, text):
    p = tmp_path / "rules.conf"
    p.write_text(text)
    return str(p)


# -- the rules -----------------------------------------------------------------------------

def rule(**opts):
    return blkdebug.Rule(blkdebug.INJECT, opts)


def test_a_rule_is_armed_by_its_event_and_fails_the_next_request():
    r = blkdebug.Rules([rule(event="read_aio", errno="28")])
    assert r.check(0, 512, blkdebug.READ) == 0          # not armed yet
    r.event("write_aio")
    assert r.check(0, 512, blkdebug.READ) == 0
    r.event("read_aio")
    assert r.check(0, 512, blkdebug.WRITE) == 28 and r.check(4096, 1, blkdebug.READ) == 28
    assert r.check(0, 0, blkdebug.BLOCK_STATUS) == 0    # not in the default types


def test_once_sector_iotype_and_state():
    r = blkdebug.Rules([rule(event="none", sector=8, once="on", iotype="block-status")])
    r.event("none")
    assert r.check(0, 4096, blkdebug.BLOCK_STATUS) == 0           # sector 8 is at 4096
    assert r.check(4096, 512, blkdebug.READ) == 0
    assert r.check(3584, 1024, blkdebug.BLOCK_STATUS) == 5
    assert r.check(3584, 1024, blkdebug.BLOCK_STATUS) == 0        # once: gone
    s = blkdebug.Rules([rule(event="l2_load", state=2),
                        blkdebug.Rule(blkdebug.SET_STATE,
                                      {"event": "l1_update", "new_state": 2})])
    s.event("l2_load")
    assert s.check(0, 1, blkdebug.READ) == 0                     # state 1: rule skipped
    s.event("l1_update")
    s.event("l2_load")
    assert s.state == 2 and s.check(0, 1, blkdebug.READ) == 5


def test_an_event_with_rules_replaces_the_active_ones():
    r = blkdebug.Rules([rule(event="read_aio", errno=5), rule(event="cluster_free", errno=28,
                                                               sector=100)])
    r.event("read_aio")
    r.event("cluster_free")
    assert r.check(0, 512, blkdebug.READ) == 0       # read_aio's rule was dropped
    assert r.check(100 * 512, 512, blkdebug.WRITE) == 28


def test_config_file_syntax_and_errors(tmp_path):
    p = rules_file(tmp_path, '# comment\n[inject-error]\nevent = "read_aio"\nerrno = "28"\n\n'
                             '[set-state]\nevent = "l2_load"\nnew_state = "3"\n')
    got = blkdebug.read_config(p)
    assert [(x.action, x.event, x.errno, x.new_state) for x in got] == \
        [(blkdebug.INJECT, "read_aio", 28, 0), (blkdebug.SET_STATE, "l2_load", 5, 3)]
    for text, why in (('[inject-error]\nevent = read_aio\n', f"{p}:2: Parse error"),
                      ('[nope]\n', f"{p}:1: There is no option group 'nope'"),
                      ('event = "read_aio"\n', f"{p}:1: No group defined"),
                      ('[inject-error]\nevent = "nope"\n',
                       "Parameter 'event' does not accept value 'nope'"),
                      ('[inject-error]\nerrno = "5"\n', "Missing event name for rule"),
                      ('[inject-error]\nevent = "none"\nonce = "maybe"\n',
                       "Parameter 'once' expects 'on' or 'off'")):
        rules_file(tmp_path, text)
        with pytest.raises(InvalidArgumentError, match="^" + why.replace("(", r"\(")):
            blkdebug.read_config(p)
    with pytest.raises(InvalidArgumentError, match="Could not read blkdebug config file"):
        blkdebug.read_config(str(tmp_path / "missing"))


# -- under the engine: events ----------------------------------------------------------------

@pytest.fixture
def written(tmp_path):
    """A 1 GiB qcow2 with 512 bytes at 512, and an empty copy of it."""
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", a, "1G")
    shutil.copy(a, b)
    qemu_io(a, "write -P 102 512 512")
    return a, b


def test_read_aio_fails_compare_as_qemu(capsys, tmp_path, written):
    a, b = written
    conf = rules_file(tmp_path, '[inject-error]\nevent = "read_aio"\nerrno = "5"\n'
                                'once ="off"\n')
    want, got = both(capsys, ["compare", f"blkdebug:{conf}:{a}", b])
    assert got == want and want[0] == 4 and "Error while reading offset 0 of blkdebug:" in want[2]
    qemu_img("create", "-q", "-f", "qcow2", b, "0")
    want, got = both(capsys, ["compare", f"blkdebug:{conf}:{a}", b])
    assert got == want and "Image size mismatch" in want[1]


def test_write_aio_fails_commit_into_a_json_backing(capsys, tmp_path):
    """qemu-iotests 020's case: the base's writes fail with ENOSPC once."""
    for side in ("qemu", "ours"):
        d = tmp_path / side
        d.mkdir()
        base, top = str(d / "base.qcow2"), str(d / "top.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", base, "1M")
        backing = ("json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'inject-error': "
                   "[{'event': 'write_aio', 'errno': 28, 'once': true}], 'image': "
                   f"{{'driver': 'file', 'filename': '{base}'}}}}}}")
        qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", top)
        qemu_io(top, "write -P 7 0 64k")
    q = qemu_img("commit", str(tmp_path / "qemu" / "top.qcow2"), check=False)
    status, out, err = cli(capsys, "commit", str(tmp_path / "ours" / "top.qcow2"))
    assert (status, out, as_qemu(err)) == (q.returncode, q.stdout_text, q.stderr_text)
    assert q.stderr_text == "qemu-img: Block job failed: No space left on device\n"
    for side in ("qemu", "ours"):       # nothing was committed, nothing broken
        qemu_img("check", str(tmp_path / side / "base.qcow2"))
        qemu_img("compare", str(tmp_path / side / "top.qcow2"),
                 str(tmp_path / "qemu" / "top.qcow2"))


def test_cluster_free_fails_snapshot_delete_leaving_qemus_leaks(capsys, tmp_path):
    """qemu-iotests 217's case: deleting a snapshot, the frees fail."""
    conf = rules_file(tmp_path, '[inject-error]\nevent = "cluster_free"\nerrno = "5"\n')
    images = {}
    for side in ("qemu", "ours"):
        images[side] = img = str(tmp_path / f"{side}.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", img, "64M")
        qemu_io(img, "write 0 64k")
        qemu_img("snapshot", "-c", "foo", img)
    q = qemu_img("snapshot", "-d", "foo", f"blkdebug:{conf}:{images['qemu']}", check=False)
    status, out, err = cli(capsys, "snapshot", "-d", "foo", f"blkdebug:{conf}:{images['ours']}")
    assert (status, out, as_qemu(err)) == (q.returncode, q.stdout_text, q.stderr_text)
    assert "Failed to free the cluster and L1 table" in q.stderr_text
    checks = [qemu_img("check", images[side], check=False) for side in ("qemu", "ours")]
    assert [c.returncode for c in checks] == [3, 3]       # leaks only
    assert checks[0].stdout_text == checks[1].stdout_text.replace(images["ours"],
                                                                   images["qemu"])


# -- above a format node --------------------------------------------------------------------

def test_salvage_through_failing_block_status_and_reads(capsys, tmp_path):
    """qemu-iotests 251's case: warnings in qemu's order, the rest copied."""
    src = str(tmp_path / "src.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", src, "8M")
    qemu_io(src, "write -P 42 0 8M")
    fails = [("block-status", 2 * MiB + 8192), ("block-status", 5 * MiB + 512),
             ("read", 4 * MiB - 65536), ("read", 5 * MiB + 512), ("read", 6 * MiB),
             ("read", 6 * MiB + 512)]
    rules = ", ".join(f"{{'event': 'none', 'iotype': '{t}', 'errno': 5, 'sector': {o // 512}}}"
                      for t, o in fails)
    name = (f"json:{{'driver': 'blkdebug', 'image': {{'driver': 'qcow2', 'file': "
            f"{{'driver': 'file', 'filename': '{src}'}}}}, 'inject-error': [{rules}]}}")
    q = qemu_img("convert", "--salvage", name, str(tmp_path / "qemu.raw"), check=False)
    status, out, err = cli(capsys, "convert", "--salvage", name, str(tmp_path / "ours.raw"))
    assert (status, out, as_qemu(err)) == (q.returncode, q.stdout_text, q.stderr_text)
    assert q.stderr_text.count("warning:") == 2 * 2 + 4
    assert (tmp_path / "qemu.raw").read_bytes() == (tmp_path / "ours.raw").read_bytes()


def test_map_and_info_through_the_filter(capsys, tmp_path, written):
    a, _ = written
    opts = f"driver=blkdebug,image.driver=qcow2,image.file.driver=file,image.file.filename={a}"
    for argv in (["map", "--image-opts", opts + ",align=4k"],
                 ["map", "--output=json", "--image-opts", opts],
                 ["compare", "--image-opts", opts, f"driver=qcow2,file.filename={a}"]):
        want, got = both(capsys, argv)
        assert got == want, argv
    conf = rules_file(tmp_path, '[inject-error]\nevent = "read_aio"\n')
    nested = f"driver=qcow2,file.driver=blkdebug,file.image.filename={a},file.config={conf}"
    for argv in (["compare", "--image-opts", nested, f"driver=qcow2,file.filename={a}"],
                 ["info", "--image-opts", a]):      # (a bare first word: a node's name)
        want, got = both(capsys, argv)
        assert got == want, argv
    want, got = both(capsys, ["map", "--image-opts", opts + ",align=3000"])
    assert got[0] == want[0] == 1 and "Cannot meet constraints with align 3000" in got[2]


def test_data_file_child_under_blkdebug(capsys, tmp_path):
    """qemu-iotests 244's case: an existing target named by a json: node
    whose data-file child is a blkdebug node."""
    src, img = str(tmp_path / "src.qcow2"), str(tmp_path / "t.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", src, "4M")
    qemu_io(src, "write -P 9 64k 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={img}.data", img, "4M")
    name = (f"json:{{'driver': 'qcow2', 'file': {{'driver': 'file', 'filename': '{img}'}}, "
            f"'data-file': {{'driver': 'blkdebug', 'image': {{'driver': 'file', "
            f"'filename': '{img}.data'}}}}}}")
    assert cli(capsys, "convert", "-n", "-O", "qcow2", src, name)[0] == 0
    qemu_img("compare", src, img)
    want, got = both(capsys, ["compare", "-f", "qcow2", "-F", "qcow2", src, name])
    assert got == want and want[0] == 0


def test_bad_names_are_clear_errors(capsys, tmp_path, written):
    a, _ = written
    status, _, err = cli(capsys, "info", "blkdebug:nope")
    assert status == 1 and "blkdebug requires both config file and image path" in err
    status, _, err = cli(capsys, "info", f"blkdebug:{tmp_path}/missing.conf:{a}")
    assert status == 1 and "Could not read blkdebug config file" in err
    status, _, err = cli(capsys, "info", f'json:{{"driver": "blkdebug", "bogus": 1, '
                                         f'"image": {{"driver": "qcow2", "file": "{a}"}}}}')
    assert status == 1 and "doesn't support the option 'bogus'" in err


def test_convert_from_a_blkdebug_name_and_file_names(capsys, tmp_path):
    """convert takes ``blkdebug:RULES:IMAGE`` sources (a failed read is
    qemu's line: the request's first byte and the errno's words) and
    ``file:`` sources and targets, as qemu-img does."""
    src = str(tmp_path / "src.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", src, "8M")
    qemu_io(src, "write -P 1 0 8M")
    conf = rules_file(tmp_path, '[inject-error]\nevent = "read_aio"\nerrno = "5"\n'
                                'sector = "6144"\n')
    for threads in ("1", "8"):
        want, got = both(capsys, ["convert", "-m", threads, "-O", "raw", f"blkdebug:{conf}:{src}",
                                  str(tmp_path / "out.raw")])
        assert got == want and want[0] == 1
        assert want[2] == "qemu-img: error while reading at byte 2097152: Input/output error\n"
    qemu_img("convert", "-O", "raw", f"file:{src}", f"file:{tmp_path}/qemu.raw")
    assert cli(capsys, "convert", "-O", "raw", f"file:{src}", f"file:{tmp_path}/ours.raw")[0] == 0
    assert (tmp_path / "ours.raw").read_bytes() == (tmp_path / "qemu.raw").read_bytes()
    qemu_img("dd", f"if=file:{src}", f"of=file:{tmp_path}/qemu-dd.raw")
    assert cli(capsys, "dd", f"if=file:{src}", f"of=file:{tmp_path}/ours-dd.raw")[0] == 0
    assert (tmp_path / "ours-dd.raw").read_bytes() == (tmp_path / "qemu-dd.raw").read_bytes()
    # check reads the file itself: refused through the filter, not run without its rules
    status, _, err = cli(capsys, "check", f"blkdebug:{conf}:{src}")
    assert status == 1 and "check does not run through the blkdebug filter" in err
