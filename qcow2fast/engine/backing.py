"""Backing files: resolving names and probing formats (opening the chain
is engine/chain.py).

Unlike qemu 7.2, a chain is bounded (MAX_CHAIN_DEPTH images, the top
included; ``open(..., max_chain_depth=N)`` changes it) and a loop is an
error, and a backing file without a recorded format is probed only for the
qcow2 magic (anything else is read as raw).
"""

import os

from ..host import remote
from ..spec import header as hdr

MAX_CHAIN_DEPTH = 4096      # real chains reach 1000 (arXiv 2205.06842); qemu has no bound


FILE_PROTOCOL = "file:"


def resolve_backing_path(image_path, name):
    """qemu resolves a relative backing name against the image's directory
    (a remote image's: its URL, host/remote.py); a ``file:`` name (the file
    protocol, named) is a path as it is."""
    if name.startswith(FILE_PROTOCOL):
        return name[len(FILE_PROTOCOL):]
    if remote.is_url(image_path) or remote.is_url(name):
        return remote.join(image_path, name)
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def probe_format(path, remote_options=None):
    return "qcow2" if read_head(path, 4, remote_options) == hdr.QCOW_MAGIC else "raw"


def read_head(path, n, remote_options=None):
    """The first ``n`` bytes of the image file ``path`` (local or remote)."""
    if remote.is_remote(path):
        return remote.read_head(path, n, remote_options)
    with open(path, "rb") as f:
        return f.read(n)


def identity(path):
    """What makes two names the same image (loop detection)."""
    return path if remote.is_url(path) else os.path.realpath(path)
