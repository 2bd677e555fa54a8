"""Golden comparison over a matrix of images made by qemu-img: the JSON of
info, check, map and measure equals qemu-img's, key for key.

Fields that depend on the tool: none are left out -- both tools are run on
the same file name, so "filename" and the chain's file names agree."""

import json

import pytest

import qcow2fast
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import qemu_create, qemu_img, qemu_io, run_python

pytestmark = pytest.mark.qemu
MiB = 1 << 20

# (cluster size, refcount bits, compat, extended L2 entries)
GEOMETRIES = [(512, 16, "1.1", False), (512, 1, "1.1", False), (65536, 16, "1.1", False),
              (65536, 64, "1.1", False), (65536, 16, "0.10", False), (2 * MiB, 8, "1.1", False),
              (4096, 2, "1.1", False), (16384, 64, "1.1", True), (65536, 16, "1.1", True),
              (2 * MiB, 16, "1.1", True)]
FEATURES = ["plain", "compressed", "zeroes", "chain", "snapshot", "lazy-dirty"]


def make(tmp_path, cs, rb, compat, ext, feature):
    size = max(8 * MiB, 8 * cs)
    path = str(tmp_path / "img.qcow2")
    opts = {"extended_l2": "on"} if ext else {}
    if feature == "chain":
        base = qemu_create(tmp_path / "base.qcow2", size, cluster_size=cs, refcount_bits=rb,
                           compat=compat)
        qemu_io(base, f"write -P 1 0 {3 * cs}", f"write -P 2 {4 * cs} {cs}")
        qemu_create(path, size + cs, cluster_size=cs, refcount_bits=rb, compat=compat,
                    backing="base.qcow2", **opts)
        qemu_io(path, f"write -P 3 {cs} {cs}", f"write -P 4 {6 * cs + cs // 8} {cs // 16}")
        return path
    if feature == "lazy-dirty":
        qcow2fast.create(path, size, cluster_size=cs, refcount_bits=rb, lazy_refcounts=True,
                         extended_l2=ext)
        run_python(f"""
import os, qcow2fast
img = qcow2fast.open({path!r}, "r+")
for i in range(3):
    img.write(i * {2 * cs} + 100, b"d" * {cs})
img.flush()
os._exit(0)
""")
        return path
    qemu_create(path, size, cluster_size=cs, refcount_bits=rb, compat=compat, **opts)
    ops = [f"write -P 5 0 {2 * cs}", f"write -P 6 {3 * cs + 512} 1000"]
    if feature == "compressed":
        ops.append(f"write -c -P 7 {6 * cs} {cs}")
    if feature == "zeroes":
        ops += [f"write -z {2 * cs} {cs}", f"discard {cs} {cs}",
                f"write -z {4 * cs + cs // 4} {cs // 2}"]
    qemu_io(path, *ops)
    if feature == "snapshot":
        qemu_img("snapshot", "-c", "s1", path)
        qemu_io(path, f"write -P 8 0 {cs}")
    return path


def possible(geom, feature):
    """Combinations qemu can make: with 1-bit refcounts it can neither
    compress nor snapshot; lazy refcounts need compat 1.1."""
    _, rb, compat, _ = geom
    if rb == 1 and feature in ("compressed", "snapshot"):
        return False
    return not (compat == "0.10" and feature == "lazy-dirty")


MATRIX = [pytest.param(g, f, id=f"cs{g[0]}-rb{g[1]}-v{g[2]}{'-ext' if g[3] else ''}-{f}")
          for g in GEOMETRIES for f in FEATURES if possible(g, f)]


@pytest.mark.parametrize("geom,feature", MATRIX)
def test_json_equals_qemu(capsys, tmp_path, geom, feature):
    path = make(tmp_path, *geom, feature)
    for argv in (["info", "--output=json", path],
                 ["map", "--output=json", path],
                 ["measure", "--output=json", "-O", "qcow2", path],
                 ["check", "--output=json", path]):
        status, out, _ = run_cli(capsys, *argv)
        q = qemu_img(*argv, check=False)
        assert status == q.returncode, (argv, status, q.returncode, q.stderr_text)
        assert json.loads(out) == json.loads(q.stdout_text), argv
