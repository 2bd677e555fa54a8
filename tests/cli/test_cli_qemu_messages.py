"""What qemu-iotests 049, 054, 112 and 242 compare: qemu-img's messages
for bad creation options and for images it will not open, each checked
against the real qemu-img 7.2 on the same arguments and the same file."""

import shutil
import struct

import pytest

from tests.cli.test_cli_qemu_syntax import ours_as_qemu
from tests.helpers.cli_util import run_cli as cli
from tests.helpers.qemu_util import header, patch, qemu_create, qemu_img, qemu_io, read_extensions

pytestmark = pytest.mark.qemu
MiB = 1 << 20
BITMAPS_EXT = 0x23852875


@pytest.mark.parametrize("options", [
    "cluster_size=1000", "cluster_size=4M", "compat=0.42", "compat=foobar",
    "refcount_bits=3", "refcount_bits=128", "compat=0.10,refcount_bits=8",
    "compat=0.10,lazy_refcounts=on", "compression_type=foo",
    "compat=0.10,compression_type=zstd", "compat=0.10,extended_l2=on",
    "extended_l2=on,cluster_size=4k", "preallocation=1234", "backing_fmt=raw",
    "backing_file=",
])
def test_create_option_errors_are_qemus(capsys, tmp_path, options):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    status, _, err = cli(capsys, "create", "-f", "qcow2", "-o", options, ours, "1M")
    want = qemu_img("create", "-f", "qcow2", "-o", options, theirs, "1M", check=False)
    assert want.returncode == 1 and status == 1
    assert ours_as_qemu(err, (ours, theirs)) == want.stderr.decode()


def test_create_empty_backing_name(capsys, tmp_path):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    status, out, err = cli(capsys, "create", "-f", "qcow2", "-b", "", ours, "1M")
    want = qemu_img("create", "-f", "qcow2", "-b", "", theirs, "1M", check=False)
    assert (status, out) == (want.returncode, want.stdout.decode()) == (1, "")
    assert ours_as_qemu(err, (ours, theirs)) == want.stderr.decode()
    assert not ours.exists()


def test_create_encryption_off_is_a_plain_image(capsys, tmp_path):
    """``-o encryption=off`` (the legacy spelling) asks for no encryption:
    the image is made, and the Formatting line shows it first, as qemu's."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    status, out, err = cli(capsys, "create", "-f", "qcow2", "-o", "encryption=off", ours, "64M")
    want = qemu_img("create", "-f", "qcow2", "-o", "encryption=off", theirs, "64M")
    assert (status, err) == (0, "")
    assert out.replace(str(ours), str(theirs)) == want.stdout.decode()
    assert "fmt=qcow2 encryption=off cluster_size=65536" in out
    assert qemu_img("check", ours).returncode == 0


@pytest.mark.parametrize("size,words", [(1 << 60, "Image is too big"),
                                        (1 << 40, "L1 table is too small")])
def test_open_of_a_size_the_l1_table_cannot_map(capsys, tmp_path, size, words):
    """iotest 054: the header's size raised past what l1_size maps.  The
    library's error names the field; the command line says qemu's words."""
    img = qemu_create(tmp_path / "img.qcow2", 4 << 30)
    patch(img, 24, ">Q", size)
    want = qemu_img("check", img, check=False)
    assert f"Could not open '{img}': {words}\n" in want.stderr.decode()
    for cmd in ("check", "info"):
        status, _, err = cli(capsys, cmd, img)
        assert status == 1
        assert ours_as_qemu(err) == f"qemu-img: Could not open '{img}': {words}\n"
    import qcow2fast
    from qcow2fast.errors import CorruptImageError
    with pytest.raises(CorruptImageError, match="l1_size at offset 0x24"):
        qcow2fast.open(str(img))


def test_open_of_a_bitmap_with_reserved_flags(capsys, tmp_path):
    """iotest 242: an unknown flag in a bitmap directory entry."""
    img = qemu_create(tmp_path / "img.qcow2", MiB)
    qemu_img("bitmap", "--add", img, "bitmap-0")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(img, theirs)
    exts, _ = read_extensions(img)
    data, = [d for t, d in exts if t == BITMAPS_EXT]
    entry_offset, = struct.unpack_from(">Q", data, 16)     # bitmap_directory_offset
    for path in (img, theirs):
        patch(path, entry_offset + 12, ">I", 0x4 | 0x2)   # flags: reserved bit, auto
    want = qemu_img("info", theirs, check=False)
    status, _, err = cli(capsys, "info", img)
    assert status == want.returncode == 1
    assert ours_as_qemu(err, (img, theirs)) == want.stderr.decode()
    assert "Bitmap 'bitmap-0' doesn't satisfy the constraints\n" in err


def test_create_format_file_is_the_plain_file(capsys, tmp_path):
    """iotest 142: ``create -f file`` (the protocol as a format) empties the
    file and sizes it, over an existing image too, as qemu-img does."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for path in (ours, theirs):
        qemu_create(path, 4 * MiB)
    status, out, err = cli(capsys, "create", "-f", "file", ours, "1M")
    want = qemu_img("create", "-f", "file", theirs, "1M")
    assert (status, err) == (0, "")
    assert out.replace(str(ours), str(theirs)) == want.stdout.decode()
    assert ours.read_bytes() == theirs.read_bytes() == bytes(MiB)


@pytest.mark.parametrize("writes", [
    ["0 1M", "2M 1M", "4M 1M", "32M 1M"],           # iotest 086: four steps of 25 %
    ["0 5M", "100M 1536k"], [],                      # chunks of 2 MiB; no data at all
])
def test_convert_progress_like_qemu(capsys, tmp_path, writes):
    src = qemu_create(tmp_path / "src.qcow2", 128 * MiB)
    for w in writes:
        qemu_io(src, f"write {w}")
    status, out, err = cli(capsys, "convert", "-p", "-O", "qcow2", src, tmp_path / "ours")
    want = qemu_img("convert", "-p", "-O", "qcow2", src, tmp_path / "theirs")
    assert (status, err) == (0, "")
    assert out == want.stdout.decode()


@pytest.mark.parametrize("argv", [
    # iotest 082: -o help with and without the target's name, raw and qcow2
    ["create", "-f", "qcow2", "-o", "help", "T", "128M"], ["create", "-f", "qcow2", "-o", "help"],
    ["create", "-o", "help"], ["create", "-f", "raw", "-o", "help", "T", "1M"],
    ["create", "-f", "qcow2", "-o", "cluster_size=4k", "-o", "?", "T", "128M"],
    ["convert", "-O", "qcow2", "-o", "help", "S", "T"], ["convert", "-O", "qcow2", "-o", "help"],
    ["convert", "-o", "help"],
    # option lists qemu-img refuses, formats it cannot create
    ["create", "-f", "qcow2", "-o", "backing_file=S,", "-o", "help", "T", "1M"],
    ["create", "-f", "qcow2", "-o", ",help", "T", "1M"],
    ["convert", "-O", "qcow2", "-o", "backing_file=S", "-o", ",,", "-o", "help", "S", "T"],
    ["create", "-f", "bochs", "-o", "help"], ["create", "-f", "bochs", "T", "1M"],
    ["create", "-f", "foo", "T", "1M"], ["convert", "-O", "bochs", "-o", "help"],
    ["convert", "-O", "foo", "S", "T"],
    # copy offloading's conflicts
    ["convert", "-C", "-S", "4k", "-O", "qcow2", "S", "T"],
    ["convert", "-C", "-S", "0", "-O", "qcow2", "S", "T"],
    ["convert", "-C", "-c", "-O", "qcow2", "S", "T"],
    # a backing file given as an option that does not exist
    ["convert", "-O", "qcow2", "-o", "backing_fmt=qcow2,backing_file=S,,help", "S", "T"],
])
def test_options_help_and_refusals_like_qemu(capsys, tmp_path, argv):
    src = qemu_create(tmp_path / "src.qcow2", MiB)

    def fill(target):
        return [a.replace("S", str(src)).replace("T", str(target))
                if a in ("S", "T") or a.startswith(("backing_file=S", "backing_fmt=qcow2,"))
                else a for a in argv]
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    status, out, err = cli(capsys, *fill(ours))
    want = qemu_img(*fill(theirs), check=False)
    assert status == want.returncode
    assert out.replace(str(ours), str(theirs)) == want.stdout.decode()
    assert ours_as_qemu(err, (ours, theirs)) == want.stderr.decode()


def test_amend_upgrade_then_resize_and_downgrade_with_snapshots(capsys, tmp_path):
    """iotest 061: ``amend -o compat=1.1,size=128M`` of a v2 image with a
    snapshot upgrades first, so the resize is allowed; a later
    ``compat=0.10,size=32M`` downgrades when every snapshot has the size
    the image will have.  Both tools end with the same header fields."""
    heads = []
    for tool in ("ours", "qemu"):
        img = qemu_create(tmp_path / f"{tool}.qcow2", 32 * MiB, compat="0.10")
        qemu_img("snapshot", "-c", "foo", img)
        for opts in ("compat=1.1,size=128M", "compat=0.10,size=32M"):
            if tool == "ours":
                status, _, err = cli(capsys, "amend", "-o", opts, img)
                assert (status, err) == (0, "")
            else:
                qemu_img("amend", "-o", opts, img)
            heads.append((tool, opts, header(img)["version"], header(img)["size"]))
    assert [h[1:] for h in heads[:2]] == [h[1:] for h in heads[2:]] == [
        ("compat=1.1,size=128M", 3, 128 * MiB), ("compat=0.10,size=32M", 2, 32 * MiB)]


def test_file_protocol_names_with_colons(capsys, tmp_path, monkeypatch):
    """iotest 126: ``create`` of ``file:a:b.qcow2`` makes ``a:b.qcow2``; info
    of ``file:image:top.qcow2`` (relative) shows ``./image:top.qcow2`` and
    the backing file's actual path ``./base.qcow2``, as qemu-img."""
    monkeypatch.chdir(tmp_path)
    qemu_create(tmp_path / "base.qcow2", MiB)
    argv = ["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "file:image:top.qcow2"]
    status, out, err = cli(capsys, *argv)
    assert (status, err) == (0, "") and (tmp_path / "image:top.qcow2").exists()
    (tmp_path / "image:top.qcow2").rename(tmp_path / "ours:top.qcow2")
    want = qemu_img(*argv)
    assert out == want.stdout.decode()
    status, out, _ = cli(capsys, "info", "file:ours:top.qcow2")
    want = qemu_img("info", "file:image:top.qcow2").stdout.decode()
    assert status == 0 and out.replace("ours:top", "image:top") == want
    assert "image: ./image:top.qcow2\n" in want


def test_info_image_opts_shows_the_file_name(capsys, tmp_path):
    """iotest 279: ``info --image-opts driver=qcow2,file.filename=F`` shows
    the image as F, as qemu-img does."""
    img = qemu_create(tmp_path / "img.qcow2", MiB)
    opts = f"driver=qcow2,file.driver=file,file.filename={img}"
    status, out, _ = cli(capsys, "info", "--image-opts", opts)
    want = qemu_img("info", "--image-opts", opts).stdout.decode()
    assert status == 0 and out == want and out.startswith(f"image: {img}\n")


@pytest.mark.parametrize("quiet", [[], ["-q"]])
def test_create_over_a_blkdebug_backing_name(capsys, tmp_path, quiet):
    """A blkdebug:RULES:IMAGE backing name (iotest 041): create takes the
    size of the image it wraps and writes the name as given, as qemu-img."""
    base = tmp_path / "b.img"
    qemu_img("create", "-f", "raw", base, "3M")
    rules = tmp_path / "rules"
    rules.write_text("\n")
    opt = f"backing_file=blkdebug:{rules}:{base},backing_fmt=raw"
    ref = qemu_img("create", *quiet, "-f", "qcow2", "-o", opt, tmp_path / "q.qcow2")
    status, out, err = cli(capsys, "create", *quiet, "-f", "qcow2", "-o", opt,
                           tmp_path / "f.qcow2")
    assert (status, err) == (0, "")
    assert out.replace("f.qcow2", "q.qcow2") == ref.stdout_text
    assert (tmp_path / "f.qcow2").read_bytes() == (tmp_path / "q.qcow2").read_bytes()


@pytest.mark.parametrize("image", ["top.qcow2", "sub/top.qcow2", "b3.qcow2"])
@pytest.mark.parametrize("argv", [
    ["check", "IMG"], ["map", "IMG"], ["compare", "IMG", "IMG"],
    ["convert", "-O", "raw", "IMG", "out.raw"], ["commit", "IMG"], ["snapshot", "-c", "s1", "IMG"],
    ["snapshot", "-l", "IMG"], ["info", "--backing-chain", "IMG"],
    ["rebase", "-b", "b2.qcow2", "-F", "qcow2", "IMG"], ["dd", "bs=1M", "count=1", "of=dd.raw",
                                                       "if=IMG"],
])
def test_a_missing_backing_file_as_qemu(capsys, tmp_path, monkeypatch, image, argv):
    """A backing file that is not there, one or two layers down, named as
    qemu names it (relative to the name given, "Could not open backing
    file: " once per level), whatever the command; same status."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2",
             "sub/top.qcow2", "1M")
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", str(tmp_path / "gone.qcow2"), "-F",
             "qcow2", "top.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "b1.qcow2", "1M")
    for k in (2, 3):
        qemu_img("create", "-q", "-f", "qcow2", "-b", f"b{k - 1}.qcow2", "-F", "qcow2",
                 f"b{k}.qcow2")
    (tmp_path / "b1.qcow2").unlink()
    line = [x.replace("IMG", image) for x in argv]
    want = qemu_img(*line, check=False)
    status, out, err = cli(capsys, *line)
    assert want.returncode != 0
    assert (status, out) == (want.returncode, want.stdout.decode())
    assert err.replace("qcow2fast: ", "qemu-img: ") == want.stderr.decode()


@pytest.mark.parametrize("options", [[], ["-o", "preallocation=off"], ["-o", "preallocation=falloc"],
                                     ["-o", "preallocation=full"],
                                     ["-o", "preallocation=metadata"],
                                     ["-o", "preallocation=bogus"], ["-o", "foo=bar"]])
def test_create_raw_as_qemus_file_driver(capsys, tmp_path, options):
    """create -f raw: qemu's file options (preallocation off/falloc/full),
    its lines and messages, and the same file: its size and the blocks it
    holds (off allocates the first block, as qemu's allocate_first_block)."""
    mine, theirs = tmp_path / "ours.raw", tmp_path / "qemu.raw"
    want = qemu_img("create", "-f", "raw", *options, theirs, "1M", check=False)
    status, out, err = cli(capsys, "create", "-f", "raw", *options, str(mine), "1M")
    assert (status, ours_as_qemu(out, (mine, theirs)), ours_as_qemu(err, (mine, theirs))) == \
        (want.returncode, want.stdout_text, want.stderr_text)
    if status == 0:
        a, b = mine.stat(), theirs.stat()
        assert (a.st_size, a.st_blocks) == (b.st_size, b.st_blocks)
        assert mine.read_bytes() == bytes(1 << 20)


# Usage errors: operands too few or too many, option values qemu-img's
# cvtnum and QemuOpts refuse, unknown and incomplete options; missing files.  "I" is an
# image with a backing file, "T" a new file's name.
USAGE_ERRORS = [
    [], ["frob"], ["info"], ["info", "I", "I"], ["check"], ["check", "I", "I"], ["map"],
    ["bench"], ["compare", "I"], ["compare", "I", "I", "I"], ["commit"], ["commit", "I", "I"],
    ["rebase", "I"], ["rebase", "-u"], ["snapshot", "-l"], ["snapshot", "-l", "-c", "s", "I"],
    ["resize"], ["resize", "I"], ["resize", "I", "1G", "extra"], ["resize", "I", "abc"],
    ["amend", "I"], ["amend", "-o", "lazy_refcounts=on", "I", "I"], ["create"],
    ["create", "-f", "qcow2"], ["create", "-f", "qcow2", "T", "1G", "extra"],
    ["create", "-f", "qcow2", "T", "-1"], ["create", "-f", "qcow2", "T", "abc"],
    ["create", "-f", "qcow2", "T", "9E"], ["convert"], ["convert", "I"],
    ["measure"], ["measure", "-O", "qcow2"], ["measure", "--size", "1G", "I"],
    ["measure", "--size", "abc"], ["measure", "-f", "qcow2", "--size", "1G"], ["measure", "I", "I"],
    ["dd"], ["dd", "if=I"], ["dd", "if=I", "of=T", "conv=notrunc"], ["dd", "if=I", "of=T", "bs=0"],
    ["dd", "if=I", "of=T", "bs=abc"], ["dd", "if=I", "of=T", "count=-1"],
    ["check", "-r", "bogus", "I"], ["info", "--output=xml", "I"], ["map", "--output=xml", "I"],
    ["measure", "--output=xml", "--size", "1G"], ["info", "-f"], ["info", "I", "-f"],
    ["info", "I", "--output"], ["map", "-x", "I"], ["info", "--bogus", "I"],
    ["info", "--force-share=1", "I"], ["convert", "--t", "I", "O"], ["info", "-f", "bogus", "I"],
    ["check", "-T", "bogus", "I"], ["compare", "-T", "bogus", "I", "I"],
    ["convert", "-T", "bogus", "I", "T"], ["info", "--f", "I"], ["check", "--repair=bogus", "I"],
    ["map", "--s", "1M", "I"], ["convert", "-r", "bogus", "I", "T"],
    ["map", "--start-offset=abc", "I"], ["map", "--max-length=1E1", "I"],
    ["bench", "-s", "4G", "I"], ["bench", "-S", "abc", "I"], ["bench", "-o", "x", "I"],
    ["commit", "-r", "abc", "I"], ["convert", "-S", "3", "I", "T"],
    ["convert", "-S", "32M", "I", "T"], ["convert", "-S", "abc", "I", "T"],
    ["convert", "-t", "bogus", "I", "T"], ["bitmap", "-g", "abc", "--add", "I", "b"],
    ["bitmap", "-g", "1k", "I", "b"], ["bitmap", "--add", "I"],
    # -o values QemuOpts refuse (create: after the file's name; measure: and a line)
    ["create", "-f", "qcow2", "-o", "cluster_size=abc", "T", "1G"],
    ["create", "-f", "qcow2", "-o", "cluster_size", "T", "1G"],
    ["create", "-f", "qcow2", "-o", "refcount_bits=abc", "T", "1G"],
    ["create", "-f", "qcow2", "-o", "lazy_refcounts=ON", "T", "1G"],
    ["create", "-f", "qcow2", "-o", "bogus", "T", "1G"],
    ["create", "-f", "qcow2", "-o", "encrypt.foo=1", "T", "1G"],
    ["convert", "-O", "qcow2", "-o", "bogus=1", "I", "T"],
    ["convert", "-O", "qcow2", "-o", "lazy_refcounts=abc", "I", "T"],
    ["convert", "-O", "raw", "-o", "bogus=1", "I", "T"],
    ["measure", "-O", "qcow2", "-o", "bogus=1", "--size", "1G"],
    ["measure", "-O", "qcow2", "-o", "cluster_size=abc", "--size", "1G"],
    ["measure", "-O", "raw", "-o", "bogus=1", "--size", "1G"],
    # files that are not there, names refused
    ["convert", "-O", "qcow2", "nosuch", "T"], ["convert", "-n", "-O", "qcow2", "I", "nosuch"],
    ["rebase", "-b", "nosuch.qcow2", "I"], ["bitmap", "--add", "I", ""],
]


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=" ".join)
def test_usage_errors_like_qemu(capsys, tmp_path, argv):
    base = qemu_create(tmp_path / "base.qcow2", MiB)
    image = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", image)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"

    def fill(target):
        return [str(image) if a == "I" else str(target) if a == "T"
                else a.replace("=I", f"={image}").replace("=T", f"={target}") for a in argv]
    status, out, err = cli(capsys, *fill(ours))
    want = qemu_img(*fill(theirs), check=False)
    assert (status, out) == (want.returncode, want.stdout.decode())
    assert ours_as_qemu(err, (ours, theirs)).replace("'qcow2fast --help'", "'qemu-img --help'") \
        == want.stderr.decode()
    assert not ours.exists()
