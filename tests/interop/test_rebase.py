"""rebase against qemu-img rebase: the same chains built twice, rebased by
each; the image shows what it showed (and what qemu's result shows), its
header names the new backing file as qemu's does, and it checks clean."""

import os

import pytest

import qcow2fast
from qcow2fast.errors import InvalidArgumentError, UnsupportedFeatureError
from tests.helpers.layers_util import Layer, deep_chain, twin, views
from tests.helpers.qemu_util import MiB, header, qemu_check, qemu_create, qemu_img, qemu_info

pytestmark = pytest.mark.qemu

W = "write -P"


def old_chain(top_opts=None, top_size=16 * MiB, base_size=16 * MiB):
    return [Layer("base.qcow2", size=base_size, writes=[f"{W} 1 0 4M", "write -c -P 8 6M 1M"]),
            Layer("mid.qcow2", cluster_size=4096,
                  writes=[f"{W} 2 1M 1M", "write -z 3M 64k", f"{W} 2 5M 4k"]),
            Layer("top.qcow2", size=top_size, writes=[f"{W} 3 3M 2M", "write -z 0 64k"],
                  **(top_opts or {}))]


OTHER = [Layer("other-base.raw", fmt="raw", size=12 * MiB, writes=[f"{W} 1 0 2M"]),
         Layer("other.qcow2", size=12 * MiB, cluster_size=512,
               writes=[f"{W} 9 8M 1M", "write -z 1M 512k"])]

DEEP = deep_chain(12, Layer("top.qcow2", writes=[f"{W} 99 2M 64k"]))

# (old chain, extra layers built beside it, -b, -F)
CASES = {
    "onto-base": (old_chain(), [], "base.qcow2", "qcow2"),
    "standalone": (old_chain(), [], "", None),
    "other-chain": (old_chain(), OTHER, "other.qcow2", "qcow2"),
    "onto-raw": (old_chain(), OTHER, "other-base.raw", "raw"),
    "extended-l2": (old_chain({"extended_l2": "on", "cluster_size": 128 * 1024}), OTHER,
                    "other.qcow2", "qcow2"),
    "v2": (old_chain({"compat": "0.10"}), OTHER, "other.qcow2", "qcow2"),
    "deep-onto-l3": (DEEP, [], "l3.qcow2", "qcow2"),
    "deep-standalone": (DEEP, [], "", None),
    "deep-onto-other": (DEEP, OTHER, "other.qcow2", "qcow2"),
    "cluster-2M": (old_chain({"cluster_size": 2 * MiB}), [], "", None),
    "top-longer": (old_chain(top_size=24 * MiB, base_size=8 * MiB), OTHER, "other.qcow2",
                   "qcow2"),
    "top-shorter": (old_chain(top_size=8 * MiB), OTHER, "other.qcow2", "qcow2"),
}


def build(tmp_path, case):
    old, extra, backing, fmt = CASES[case]
    ours, theirs = twin(str(tmp_path), old, [extra] if extra else [])
    return ours[-1], theirs[-1], backing, fmt


@pytest.mark.parametrize("case", sorted(CASES))
def test_rebase_matches_qemu(tmp_path, case):
    top, qtop, backing, fmt = build(tmp_path, case)
    before = views([top], ["qcow2"])[0]
    qemu_img("rebase", "-q", "-b", backing, *(["-F", fmt] if fmt else []), qtop)
    qcow2fast.rebase(top, backing, backing_fmt=fmt)
    assert views([top], ["qcow2"])[0] == before
    p = qemu_img("compare", top, qtop, check=False)
    assert p.returncode == 0, p.stdout_text + p.stderr_text
    qemu_check(top)
    a, b = qemu_info(top), qemu_info(qtop)
    for key in ("backing-filename", "backing-filename-format", "virtual-size"):
        assert a.get(key) == b.get(key), key
    # Never more data than qemu writes (only what differs, by unit).
    assert os.path.getsize(top) <= os.path.getsize(qtop) + 2 * qemu_info(top)["cluster-size"]


def test_rebase_same_file_as_raw(tmp_path):
    """-F raw naming a qcow2 layer of the old chain: that file's raw bytes
    are the new backing data (qemu 7.2 reuses the qcow2 layer there and
    its result no longer shows what the image showed)."""
    top, _, _, _ = build(tmp_path, "onto-base")
    before = views([top], ["qcow2"])[0]
    qcow2fast.rebase(top, "base.qcow2", backing_fmt="raw")
    assert views([top], ["qcow2"])[0] == before
    assert qemu_info(top)["backing-filename-format"] == "raw"
    qemu_check(top)


def test_rebase_unsafe_rewrites_only_the_header(tmp_path):
    top, qtop, _, _ = build(tmp_path, "onto-base")
    for args, kw in (((), {}), (("-b", "nowhere.qcow2", "-F", "qcow2"),
                                {"backing": "nowhere.qcow2", "backing_fmt": "qcow2"}),
                     (("-b", "base.qcow2", "-F", "raw"),
                      {"backing": "base.qcow2", "backing_fmt": "raw"})):
        os.rename(os.path.join(os.path.dirname(top), "mid.qcow2"), top + ".mid")
        qemu_img("rebase", "-u", *args, qtop)
        qcow2fast.rebase(top, kw.get("backing"), backing_fmt=kw.get("backing_fmt"), unsafe=True)
        with open(top, "rb") as f, open(qtop, "rb") as g:
            assert f.read() == g.read()
        os.rename(top + ".mid", os.path.join(os.path.dirname(top), "mid.qcow2"))


def test_rebase_progress_and_nothing_else_written(tmp_path):
    top, _, _, _ = build(tmp_path, "other-chain")
    d = os.path.dirname(top)
    others = [os.path.join(d, n) for n in os.listdir(d) if n != "top.qcow2"]
    stamps = {p: os.stat(p).st_mtime_ns for p in others}
    seen = []
    qcow2fast.rebase(top, "other.qcow2", backing_fmt="qcow2",
                     progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 16 * MiB) and seen[-1] == (16 * MiB, 16 * MiB)
    assert all(os.stat(p).st_mtime_ns == stamps[p] for p in others)


def test_rebase_bad_input(tmp_path):
    top, _, _, _ = build(tmp_path, "onto-base")
    before = open(top, "rb").read()
    with pytest.raises(InvalidArgumentError, match="backing format must be specified"):
        qcow2fast.rebase(top, "base.qcow2")
    with pytest.raises(InvalidArgumentError, match="Could not open new backing file 'nothere'"):
        qcow2fast.rebase(top, "nothere", backing_fmt="qcow2")
    with pytest.raises(UnsupportedFeatureError, match="'vmdk'"):
        qcow2fast.rebase(top, "base.qcow2", backing_fmt="vmdk")
    with pytest.raises(InvalidArgumentError, match="Invalid cache option"):
        qcow2fast.rebase(top, "base.qcow2", backing_fmt="qcow2", cache="fast")
    small = qemu_create(tmp_path / "small.qcow2", MiB, cluster_size=512)
    with pytest.raises(InvalidArgumentError, match="No space left in the file header"):
        qcow2fast.rebase(small, "x" * 1000, backing_fmt="qcow2", unsafe=True)
    # the new backing file is not a qcow2 image although -F says so
    with open(os.path.join(os.path.dirname(top), "junk"), "wb") as f:
        f.write(b"junk" * 1000)
    with pytest.raises(InvalidArgumentError, match="Could not open new backing file 'junk'"):
        qcow2fast.rebase(top, "junk", backing_fmt="qcow2")
    assert open(top, "rb").read() == before


class Stop(Exception):
    pass


def test_rebase_interrupted_keeps_the_view(tmp_path):
    """Interrupted while copying: the header still names the old backing
    file, the image shows what it showed and checks clean."""
    top, _, _, _ = build(tmp_path, "other-chain")
    before = views([top], ["qcow2"])[0]
    old_header = header(top)

    def stop(done, total):
        if done > 4 * MiB:
            raise Stop

    with pytest.raises(Stop):
        qcow2fast.rebase(top, "other.qcow2", backing_fmt="qcow2", progress=stop)
    assert header(top)["backing_file_offset"] == old_header["backing_file_offset"]
    assert qemu_info(top)["backing-filename"] == "mid.qcow2"
    assert views([top], ["qcow2"])[0] == before
    assert not qemu_check(top, expect_clean=False).get("corruptions")
    qcow2fast.rebase(top, "other.qcow2", backing_fmt="qcow2")
    assert views([top], ["qcow2"])[0] == before
    qemu_check(top)


def test_rebase_broken_chains(tmp_path):
    """A missing old backing file or a loop: safe mode refuses, naming the
    layer, and writes nothing; -u repairs the header (what it is for)."""
    top, _, _, _ = build(tmp_path, "onto-base")
    d = os.path.dirname(top)
    os.rename(os.path.join(d, "mid.qcow2"), os.path.join(d, "mid.moved"))
    before = open(top, "rb").read()
    with pytest.raises(OSError, match="mid.qcow2"):
        qcow2fast.rebase(top, "base.qcow2", backing_fmt="qcow2")
    assert open(top, "rb").read() == before
    qcow2fast.rebase(top, "mid.moved", backing_fmt="qcow2", unsafe=True)
    assert qemu_info(top)["backing-filename"] == "mid.moved"
    qemu_img("compare", top, os.path.join(str(tmp_path), "qemu", "top.qcow2"))
    # a loop: mid.moved -> top -> mid.moved
    qemu_img("rebase", "-u", "-b", "top.qcow2", "-F", "qcow2", os.path.join(d, "mid.moved"))
    before = open(top, "rb").read()
    with pytest.raises(qcow2fast.CorruptImageError, match="loops"):
        qcow2fast.rebase(top, "base.qcow2", backing_fmt="qcow2")
    with pytest.raises(qcow2fast.CorruptImageError, match="loops"):
        qcow2fast.commit(top)
    assert open(top, "rb").read() == before


@pytest.mark.parametrize("case", ["other-chain", "extended-l2"])
def test_rebase_in_small_windows(tmp_path, monkeypatch, case):
    """Chains resolved a few MiB at a time give the same result."""
    from qcow2fast.ops import layers
    monkeypatch.setattr(layers, "WINDOW", 4 * MiB)
    top, qtop, backing, fmt = build(tmp_path, case)
    before = views([top], ["qcow2"])[0]
    qemu_img("rebase", "-q", "-b", backing, "-F", fmt, qtop)
    seen = []
    qcow2fast.rebase(top, backing, backing_fmt=fmt,
                     progress=lambda done, total: seen.append(done))
    assert views([top], ["qcow2"])[0] == before
    assert qemu_img("compare", top, qtop, check=False).returncode == 0
    qemu_check(top)
    assert len(set(seen)) > 4 and seen == sorted(seen)


def test_rebase_refuses_a_loop(tmp_path):
    """Onto an image whose chain holds this one (or onto itself): refused,
    nothing written (qemu 7.2 happens to refuse through its locks).  Unsafe
    (-u) writes the name without opening anything, as qemu-img does (iotest
    043): the image then does not open, its chain loops."""
    top, _, _, _ = build(tmp_path, "onto-base")
    d = os.path.dirname(top)
    base = os.path.join(d, "base.qcow2")
    for image, backing in ((base, "mid.qcow2"), (top, "top.qcow2")):
        before = open(image, "rb").read()
        with pytest.raises(qcow2fast.CorruptImageError, match="loop"):
            qcow2fast.rebase(image, backing, backing_fmt="qcow2")
        assert open(image, "rb").read() == before
    theirs = os.path.join(d, "tip.qcow2")
    with open(theirs, "wb") as f:
        f.write(open(top, "rb").read())
    qcow2fast.rebase(top, "top.qcow2", backing_fmt="qcow2", unsafe=True)
    qemu_img("rebase", "-u", "-b", "tip.qcow2", "-F", "qcow2", theirs)
    assert header(top)["backing_file_size"] == header(theirs)["backing_file_size"]
    with pytest.raises(qcow2fast.CorruptImageError, match="loop"):
        qcow2fast.open(top).close()
