"""Deep backing chains made by qemu, fast: a few overlay templates are made
by qemu-img/qemu-io, then layer k is a byte copy of one of them with its
backing file name (same length) and its data cluster's bytes patched.  So
every layer is a qemu-made image (layout, L1/L2 tables, refcounts) and a
1000-deep chain takes a second to build."""

import json
import os

from .qemu_util import qemu_img, qemu_io

KiB = 1024
MiB = 1024 * KiB


def layer_name(k):
    return f"c{k:05d}.qcow2"


def _template(tmp, slot, size, cs, opts, compressed):
    """An overlay of ``layer_name(0)`` (the name is patched later) with one
    cluster written at guest cluster ``slot``; returns (bytes, host offset
    of that cluster's data or None)."""
    path = os.path.join(tmp, f"t-{slot}-{cs}-{opts}-{int(compressed)}.qcow2")
    o = f"cluster_size={cs}" + (f",{opts}" if opts else "")
    qemu_img("create", "-q", "-f", "qcow2", "-o", o, "-b", layer_name(0), "-F", "qcow2",
             "-u", path, str(size))
    qemu_io(path, f"write {'-c ' if compressed else ''}-P 0xee {slot * cs} {cs}")
    host = None
    if not compressed:
        for e in json.loads(_map_own(path)):
            if e["data"] and e["depth"] == 0 and "offset" in e:
                host = e["offset"]
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data, host


def _map_own(path):
    # The template's backing file is the chain's base, already made.
    return qemu_img("map", "--output=json", "-U", path).stdout_text


def make_deep_chain(tmp, depth, *, size=4 * MiB, cs=64 * KiB, variants=(("", False),),
                    base_fmt="qcow2", base_opts=""):
    """A base (filled, pattern 0x5a; raw if ``base_fmt`` is "raw") and
    ``depth`` overlays on it, layer k writing its own cluster (guest cluster
    k mod (size/cs), bytes k & 0xff) with the options of ``variants[k %
    len(variants)]`` ((extra -o options, compressed)); returns the top's
    path.  The names are c00000.qcow2 (the base) to c<depth>.qcow2."""
    tmp = str(tmp)
    base = os.path.join(tmp, layer_name(0))
    if base_fmt == "raw":
        with open(base, "wb") as f:
            f.write(b"\x5a" * size)
    else:
        o = f"cluster_size={cs}" + (f",{base_opts}" if base_opts else "")
        qemu_img("create", "-q", "-f", "qcow2", "-o", o, base, str(size))
        qemu_io(base, f"write -P 0x5a 0 {size}")
    slots = size // cs
    templates = {}
    old = layer_name(0).encode()
    for k in range(1, depth + 1):
        opts, compressed = variants[k % len(variants)]
        vcs = cs
        for part in opts.split(","):
            if part.startswith("cluster_size="):
                vcs = int(part.split("=")[1])
        slot = k % (size // vcs)
        key = (slot, vcs, opts, compressed)
        if key not in templates:
            templates[key] = _template(tmp, slot, size, vcs,
                                       ",".join(p for p in opts.split(",")
                                                if p and not p.startswith("cluster_size=")),
                                       compressed)
        data, host = templates[key]
        image = bytearray(data)
        at = image.find(old)
        assert at > 0 and image.find(old, at + 1) < 0
        image[at:at + len(old)] = layer_name(k - 1).encode()
        if host is not None:
            image[host:host + vcs] = bytes([k & 0xff]) * vcs
        with open(os.path.join(tmp, layer_name(k)), "wb") as f:
            f.write(image)
    if base_fmt == "raw":
        first = os.path.join(tmp, layer_name(1))
        qemu_img("rebase", "-u", "-b", layer_name(0), "-F", "raw", first)
    return os.path.join(tmp, layer_name(depth))
