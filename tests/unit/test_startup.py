"""CLI start-up: what a command imports before it does any work.

Each check runs in a fresh interpreter (the test process has long imported
everything).  Not timed: the assertion is on the modules loaded, which is
what start-up time follows (numpy alone is most of it)."""

import json
import subprocess
import sys

import pytest

HEAVY = ("numpy", "qcow2fast.engine.image", "qcow2fast.ops.convert", "qcow2fast.ops.amend",
         "qcow2fast.fsck.check", "zstandard", "concurrent.futures")


def loaded_after(code):
    """The modules in sys.modules after running ``code`` in a new python."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_import_package_is_light():
    mods = loaded_after("import qcow2fast")
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))


@pytest.mark.parametrize("argv", [["info", "x.qcow2"], ["check", "x.qcow2"],
                                  ["map", "x.qcow2"], ["snapshot", "-l", "x.qcow2"],
                                  ["resize", "x.qcow2", "+1G"], ["commit", "x.qcow2"],
                                  ["create", "-f", "qcow2", "x.qcow2", "1G"],
                                  ["convert", "-O", "raw", "x.qcow2", "y.raw"]])
def test_parsing_a_command_loads_no_engine(argv):
    """Parsing builds the parser of that subcommand alone; its module
    imports the engine (and numpy) only when it runs."""
    mods = loaded_after("import qcow2fast.cli as c\n"
                        f"args = c.build_parser(c.command_name({argv!r})).parse_args({argv!r})\n"
                        f"assert args.command == {argv[0]!r}")
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))
    others = {f"qcow2fast.cli.{m}" for m in ("convert_cmd", "serve_cmd", "bench_cmd", "amend_cmd")}
    others.discard(f"qcow2fast.cli.{argv[0]}_cmd")
    assert not mods & others, sorted(mods & others)


@pytest.mark.parametrize("module", ["qcow2fast.nbd.client", "qcow2fast.ops.convert",
                                    "qcow2fast.host.remote_nbd"])
def test_nbd_client_side_loads_no_server(module):
    """The NBD client (nbd:// images, convert's nbd:// targets, which every
    convert imports) loads neither the server nor asyncio (20-25 ms); the
    package's names still resolve, the server's on first use."""
    mods = loaded_after(f"import {module}")
    assert not mods & {"asyncio", "qcow2fast.nbd.server"}, module
    mods = loaded_after("import qcow2fast.nbd as n\nassert n.serve and n.MAX_PAYLOAD")
    assert "qcow2fast.nbd.server" in mods


def test_public_names_resolve():
    import qcow2fast
    for name in qcow2fast.__all__:
        assert getattr(qcow2fast, name) is not None
    assert set(qcow2fast.__all__) <= set(dir(qcow2fast))
    with pytest.raises(AttributeError):
        qcow2fast.no_such_name  # noqa: B018


def test_full_parser_loads_no_engine():
    """--help builds every subcommand's parser: still no engine."""
    mods = loaded_after("import qcow2fast.cli as c\nc.build_parser()")
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))


def test_full_parser_still_lists_every_command(capsys):
    from qcow2fast.cli import COMMANDS, main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_plain_image_lifecycle_loads_no_luks(tmp_path):
    """Opening a plain image, taking and dropping a snapshot, resizing and
    amending it load no LUKS code (hashlib, OpenSSL through ctypes): only
    an encrypted image, or an encrypt.* amend, needs it."""
    import qcow2fast
    path = str(tmp_path / "plain.qcow2")
    qcow2fast.create(path, 1 << 20)
    mods = loaded_after(
        "import qcow2fast\n"
        f"with qcow2fast.open({path!r}, 'r+') as img:\n"
        "    img.write(0, b'x' * 4096)\n"
        "    img.create_snapshot('s')\n"
        "    img.delete_snapshot('s')\n"
        "    img.resize(2 << 20)\n"
        f"qcow2fast.amend({path!r}, {{'refcount_bits': 64}})")
    luks = {"hashlib", "qcow2fast.engine.crypto", "qcow2fast.engine.luks",
            "qcow2fast.engine.libcrypto", "qcow2fast.engine.luks_amend"}
    assert "qcow2fast.engine.image" in mods
    assert not mods & luks, sorted(mods & luks)


@pytest.mark.parametrize("argv", [["info"], ["info", "--backing-chain", "--output=json"],
                                  ["snapshot", "-l"]])
def test_short_commands_on_a_chain_load_no_numpy(tmp_path, argv):
    """info and snapshot -l of an image with a backing file and a snapshot
    run without numpy (its import is most of a command's start-up); the
    commands that still need it (check, snapshot -c/-a/-d, amend of
    compat=0.10 or refcount_bits, bitmap) are listed in the last stop's
    note."""
    import qcow2fast
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    qcow2fast.create(base, 4 << 20)
    qcow2fast.create(top, 4 << 20, backing_file=base, backing_format="qcow2")
    with qcow2fast.open(top, "r+") as img:
        img.write(0, b"x" * 65536)
        img.create_snapshot("s")
    mods = loaded_after("import sys\nfrom qcow2fast.cli import main\n"
                        f"assert main({argv + [top]!r}) == 0")
    assert "qcow2fast.engine.image" in mods        # (the image really was opened)
    assert "numpy" not in mods, "numpy loaded"


@pytest.mark.parametrize("argv", [["map", "{top}"], ["map", "--output=json", "{top}"],
                                  ["compare", "{base}", "{top}"], ["commit", "{top}"],
                                  ["resize", "{top}", "+1M"],
                                  ["resize", "--shrink", "{top}", "64K"],
                                  ["rebase", "-u", "-b", "{base}", "-F", "qcow2", "{top}"],
                                  ["rebase", "-b", "", "{top}"],
                                  ["amend", "-o", "lazy_refcounts=on", "{top}"],
                                  ["amend", "-o", "refcount_bits=1", "{top}"],
                                  ["amend", "-o", "refcount_bits=64", "{top}"]])
def test_chain_commands_load_no_numpy(tmp_path, argv):
    """map, compare, commit, resize (both ways), rebase and amend of
    lazy_refcounts and refcount_bits of an overlay made as ``create -b``
    makes it run without numpy (56 ms of a command's start-up here); the
    test fails if one of them comes to import it."""
    import qcow2fast
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    qcow2fast.create(base, 4 << 20)
    with qcow2fast.open(base, "r+") as img:
        img.write(65536, b"b" * 65536)
    qcow2fast.create(top, 4 << 20, backing_file=base, backing_format="qcow2")
    with qcow2fast.open(top, "r+") as img:
        img.write(0, b"x" * 65536)
    want = 1 if argv[0] == "compare" else 0         # (the two differ: compare's 1)
    argv = [a.format(top=top, base=base) for a in argv]
    mods = loaded_after("import sys\nfrom qcow2fast.cli import main\n"
                        f"assert main({argv!r}) == {want}")
    assert "qcow2fast.engine.image" in mods
    assert "numpy" not in mods, "numpy loaded"


@pytest.mark.parametrize("argv", [["-c", "s2"], ["-a", "s"], ["-d", "s"], ["-l"]])
@pytest.mark.parametrize("cluster_bits", [9, 16])
def test_snapshot_commands_load_no_numpy(tmp_path, argv, cluster_bits):
    """snapshot -c/-a/-d/-l walk whole L1 trees and refcount blocks in C
    without numpy; the snapshot then reads back, qemu-img check is clean."""
    import qcow2fast
    from tests.helpers.qemu_util import qemu_check
    path = str(tmp_path / "img.qcow2")
    cs = 1 << cluster_bits
    qcow2fast.create(path, 4 << 20, cluster_size=cs)
    with qcow2fast.open(path, "r+") as img:
        for off in range(0, 4 << 20, 3 * cs):
            img.write(off, bytes([off // cs % 251 + 1]) * cs)
        img.create_snapshot("s")
        img.write(0, b"\xee" * cs)             # shared, then copied on write
        before = img.read(0, img.size)
    with qcow2fast.open(path, snapshot="s") as s:
        snap = s.read(0, s.size)
    mods = loaded_after("import sys\nfrom qcow2fast.cli import main\n"
                        f"assert main({['snapshot', *argv, path]!r}) == 0")
    assert "qcow2fast.engine.image" in mods
    assert "numpy" not in mods, "numpy loaded"
    qemu_check(path)
    with qcow2fast.open(path) as img:
        assert img.read(0, img.size) == (snap if argv[0] == "-a" else before)
        names = [sn.name for sn in img.snapshots]
    assert names == {"-c": ["s", "s2"], "-a": ["s"], "-d": [], "-l": ["s"]}[argv[0]]


@pytest.mark.parametrize("options", ["cluster_size=512,refcount_bits=1", "refcount_bits=64",
                                     "preallocation=metadata,cluster_size=4096",
                                     "compat=0.10,cluster_size=2M"])
def test_create_loads_no_numpy(tmp_path, options):
    """create writes its first three clusters from bytes and array('Q'),
    and preallocates without numpy; the image checks clean and equals
    qemu-img's, byte for byte without preallocation (preallocated, the
    second refcount block sits elsewhere than qemu's)."""
    from tests.helpers.qemu_util import qemu_check, qemu_img
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    argv = ["create", "-q", "-f", "qcow2", "-o", options]
    mods = loaded_after("import sys\nfrom qcow2fast.cli import main\n"
                        f"assert main({argv + [ours, '64M']!r}) == 0")
    assert "numpy" not in mods, "numpy loaded"
    qemu_img(*argv, theirs, "64M")
    qemu_check(ours)
    qemu_img("compare", "-q", ours, theirs)
    if "preallocation" not in options:
        with open(ours, "rb") as a, open(theirs, "rb") as b:
            assert a.read() == b.read()
