"""Deep backing chains made by qemu, fast: one overlay template per kind of
layer is made by qemu-img/qemu-io (one cluster written at guest cluster 0),
then layer k is a byte copy of a template with its backing file name
(same length) patched, its L2 entry moved to guest cluster ``k mod slots``
and its data cluster's bytes set to ``k & 0xff``.  So every layer is a
qemu-made image (header, refcounts, L1/L2 layout) and a 1000-deep chain
takes about a second to build.  Used by the chain scenario and the
tests (tests/helpers/chain_util.py)."""

import json
import os
import struct

from qcow2fast.spec.header import FIELD_OFFSET, INCOMPAT_EXTL2  # (absolute: also run as benchmarks.chain_util)
from .common import KiB, MiB, run

H_L1_TABLE_OFFSET = FIELD_OFFSET["l1_table_offset"]
H_INCOMPATIBLE = FIELD_OFFSET["incompatible_features"]


def qemu_img(*args):
    return run(["qemu-img", *args])


def qemu_io(path, *cmds):
    return run(["qemu-io", "-f", "qcow2", *(a for c in cmds for a in ("-c", c)), path])


def layer_name(k):
    return f"c{k:05d}.qcow2"


def _opts(cs, opts):
    return ",".join([f"cluster_size={cs}"] + [p for p in opts.split(",") if p])


def _cluster_size(cs, opts):
    for part in opts.split(","):
        if part.startswith("cluster_size="):
            return int(part.split("=")[1])
    return cs


def _template(tmp, size, cs, opts, compressed):
    """An overlay of the base with guest cluster 0 written by qemu; returns
    (its bytes, the host offset of that cluster's data or None)."""
    path = os.path.join(tmp, f"template-{cs}-{opts}-{int(compressed)}.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", _opts(cs, opts), "-b", layer_name(0),
             "-F", "qcow2", path, str(size))
    qemu_io(path, f"write {'-c ' if compressed else ''}-P 0xee 0 {cs}")
    host = None
    if not compressed:
        for e in json.loads(qemu_img("map", "--output=json", "-U", path).stdout):
            if e["data"] and e["depth"] == 0 and "offset" in e:
                host = e["offset"]
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data, host


def _move_entry(image, cs, slot):
    """Move guest cluster 0's L2 entry to guest cluster ``slot`` (same L2 table)."""
    l1 = struct.unpack_from(">Q", image, H_L1_TABLE_OFFSET)[0]
    l2 = struct.unpack_from(">Q", image, l1)[0] & 0x00FFFFFFFFFFFE00
    width = 16 if struct.unpack_from(">Q", image, H_INCOMPATIBLE)[0] & INCOMPAT_EXTL2 else 8
    assert (slot + 1) * width <= cs
    entry = bytes(image[l2:l2 + width])
    image[l2:l2 + width] = bytes(width)
    image[l2 + slot * width:l2 + (slot + 1) * width] = entry


def make_deep_chain(tmp, depth, *, size=4 * MiB, cs=64 * KiB, variants=(("", False),),
                    base_fmt="qcow2", base_opts="", fill_base=True):
    """A base (pattern 0x5a; raw if ``base_fmt`` is "raw") and ``depth``
    overlays on it; layer k writes guest cluster ``k mod slots`` (bytes
    k & 0xff) with the options of ``variants[k % len(variants)]`` ((extra
    -o options, compressed)).  Returns the top's path; the layers are
    c00000.qcow2 (the base) to c<depth>.qcow2 in ``tmp``."""
    tmp = str(tmp)
    base = os.path.join(tmp, layer_name(0))
    # The templates are made over a qcow2 base (a raw one replaces it at the end).
    qemu_img("create", "-q", "-f", "qcow2", "-o", _opts(cs, base_opts), base, str(size))
    if fill_base and base_fmt != "raw":
        qemu_io(base, f"write -P 0x5a 0 {size}")
    templates = {}
    old = layer_name(0).encode()
    for k in range(1, depth + 1):
        opts, compressed = variants[k % len(variants)]
        vcs = _cluster_size(cs, opts)
        key = (opts, compressed)
        if key not in templates:
            templates[key] = _template(tmp, size, vcs, ",".join(
                p for p in opts.split(",") if p and not p.startswith("cluster_size=")),
                compressed)
        data, host = templates[key]
        image = bytearray(data)
        at = image.find(old)
        assert at > 0 and image.find(old, at + 1) < 0
        image[at:at + len(old)] = layer_name(k - 1).encode()
        if host is not None:
            image[host:host + vcs] = bytes([k & 0xff]) * vcs
        width = 16 if "extended_l2=on" in opts else 8
        slot = k % min(size // vcs, vcs // width)
        if slot:
            _move_entry(image, vcs, slot)
        with open(os.path.join(tmp, layer_name(k)), "wb") as f:
            f.write(image)
    if base_fmt == "raw":
        with open(base, "wb") as f:
            f.write(b"\x5a" * size)
        qemu_img("rebase", "-u", "-b", layer_name(0), "-F", "raw",
                 os.path.join(tmp, layer_name(1)))
    return os.path.join(tmp, layer_name(depth))
