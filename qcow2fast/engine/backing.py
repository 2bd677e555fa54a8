"""Backing files: resolving names and probing formats (opening the chain
is engine/chain.py).

Unlike qemu 7.2, a chain is bounded (MAX_CHAIN_DEPTH images, the top
included; ``open(..., max_chain_depth=N)`` changes it) and a loop is an
error, and a backing file without a recorded format is probed only for the
qcow2 magic (anything else is read as raw).
"""

import os

from ..spec import header as hdr

MAX_CHAIN_DEPTH = 4096      # real chains reach 1000 (arXiv 2205.06842); qemu has no bound


FILE_PROTOCOL = "file:"


def resolve_backing_path(image_path, name):
    """qemu resolves a relative backing name against the image's directory;
    a ``file:`` name (the file protocol, named) is a path as it is."""
    if name.startswith(FILE_PROTOCOL):
        return name[len(FILE_PROTOCOL):]
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def probe_format(path):
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == hdr.QCOW_MAGIC else "raw"
