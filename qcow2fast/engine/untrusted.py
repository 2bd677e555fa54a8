"""Images from an untrusted source (``qcow2fast.open(..., untrusted=True)``,
``--untrusted`` on the command line).

An uploaded image must not make the host read files it names (CVE-2015-
5162-style attacks name ``/etc/shadow`` or ``json:{...}`` as a backing
file) nor use more memory or time than a hostile header can demand.  On
top of what every open checks (spec/header.py bounds every table by the
file and by qemu's limits; compressed clusters never inflate past a
cluster), an untrusted image:

- may name a backing or external data file only by a relative path that
  stays inside the image's own directory (symbolic links resolved): no
  absolute path, no ``..`` out of it, no protocol or ``json:`` name;
- may chain at most MAX_UNTRUSTED_CHAIN images.

Memory and CPU stay within what OpenStack and KubeVirt give qemu-img
(``prlimit --as=1G --cpu=30``): see host/limits.py and
tests/hardening/test_untrusted.py, which runs the command line under those
limits on hostile images.
"""

import os

from ..errors import UntrustedImageError
from ..spec import header as hdr

MAX_UNTRUSTED_CHAIN = 16


def check_file_name(image_path, name, what, offset=None):
    """Refuse ``name`` (the ``what`` file an image at ``image_path`` names,
    stored at file ``offset``) unless it is a relative path inside the
    image's directory."""
    where = f" (at offset {offset:#x})" if offset is not None else ""

    def refuse(why):
        raise UntrustedImageError(f"{image_path}: {what} name {name!r}{where} {why}; "
                                  "refused for an untrusted image")
    if not name:
        refuse("is empty")
    if name.startswith("json:") or ":" in name.split("/", 1)[0]:
        refuse("is a protocol or json: name")
    if os.path.isabs(name):
        refuse("is an absolute path")
    base = os.path.realpath(os.path.dirname(os.path.abspath(image_path)))
    target = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, target]) != base or target == base:
        refuse("leaves the image's directory")


def check_image(path, h, chain_depth):
    """The untrusted-image rules for the image at ``path`` with header ``h``
    (``chain_depth`` images above it)."""
    if chain_depth >= MAX_UNTRUSTED_CHAIN:
        raise UntrustedImageError(f"{path}: backing chain deeper than {MAX_UNTRUSTED_CHAIN} "
                                  "images; refused for an untrusted image")
    if h.backing_file:
        check_file_name(path, h.backing_file, "backing file", h.backing_file_offset)
    for ext in h.other_extensions:
        if ext.type == hdr.EXT_DATA_FILE:
            check_file_name(path, ext.data.split(b"\0", 1)[0].decode(errors="replace"),
                            "external data file")


def check_path(path):
    """The rules for the image file at ``path`` alone (for commands, such
    as check, that read it without opening it as an Image)."""
    from ..host.file import open_image_file
    f = open_image_file(path, "qcow2", locking=False)
    try:
        size = f.size()
        check_image(path, hdr.parse_header(f.pread(0, min(size, 2 << 20)), size), 0)
    finally:
        f.close()
