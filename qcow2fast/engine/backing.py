"""Backing files: resolving, opening and bounding the chain.

Unlike qemu 7.2, a chain is bounded (MAX_CHAIN_DEPTH) and a loop is an
error, and a backing file without a recorded format is probed only for the
qcow2 magic (anything else is read as raw).
"""

import os

from ..spec import header as hdr
from ..errors import CorruptImageError, ImageLockedError, UnsupportedFeatureError
from ..host.raw import RawImage

MAX_CHAIN_DEPTH = 64


def resolve_backing_path(image_path, name):
    """qemu resolves a relative backing name against the image's directory."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def probe_format(path):
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == hdr.QCOW_MAGIC else "raw"


def open_backing(img, chain):
    """Open ``img``'s backing file read-only; ``chain`` holds the real paths
    of the images above it.  A qcow2 backing file is opened as an image of
    ``img``'s own class.  The image returned is read by ``img``'s C read
    path directly (``ImageCore._read_below``): a qcow2 image through its own
    C path, a raw file through its ``file``."""
    name = img.header.backing_file
    if ":" in name.split("/")[0] and not os.path.exists(resolve_backing_path(img.path, name)):
        raise UnsupportedFeatureError(f"backing file {name!r}: protocols are not supported",
                                      feature="backing protocol")
    path = resolve_backing_path(img.path, name)
    chain = chain + (os.path.realpath(img.path),)
    where = hdr.FIELD_OFFSET["backing_file_offset"]
    if os.path.realpath(path) in chain:
        raise CorruptImageError(f"backing chain loops: {img.path} -> {name} is already in the "
                                "chain", offset=where, field="backing_file")
    if len(chain) >= MAX_CHAIN_DEPTH:
        raise CorruptImageError(f"backing chain deeper than {MAX_CHAIN_DEPTH} images",
                                offset=where, field="backing_file")
    if not os.path.exists(path):
        raise FileNotFoundError(2, f"could not open backing file {name!r} of {img.path}", path)
    fmt = img.header.backing_format or probe_format(path)
    try:
        if fmt == "qcow2":
            return type(img)(path, "r", cache_mode=_read_cache_mode(img.cache_mode),
                             cache_clean_interval=0, force_share=img.force_share,
                             locking=img.locking, untrusted=img.untrusted, _chain=chain)
        if fmt == "raw":
            return RawImage(path, force_share=img.force_share, locking=img.locking)
    except ImageLockedError as e:       # in qemu's words
        detail = f"Could not open backing file: {e.detail}"
        raise ImageLockedError(f"Could not open '{img.path}': {detail}", path=e.path,
                               detail=detail) from None
    raise UnsupportedFeatureError(f"backing file format {fmt!r} is not supported",
                                  feature="backing format")


def _read_cache_mode(mode):
    return "none" if mode in ("none", "directsync") else "writeback"
