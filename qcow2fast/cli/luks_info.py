"""``info`` of a raw LUKS volume (qemu's luks format, ops/luks_create.py):
what its header says, as qemu-img info prints it (no passphrase needed)."""

import os

from ..spec import luks as L


def is_luks(path):
    """Whether the file ``path`` starts with the LUKS magic (qemu probes so)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(L.MAGIC)) == L.MAGIC
    except OSError:
        return False


def luks_info(path, name):
    """qemu-img's ImageInfo of the volume ``path`` shown as ``name``."""
    from ..engine import crypto     # (the cipher stack only for a LUKS volume: start-up)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        h = L.parse(f.read(L.HEADER_SIZE), st.st_size)
    data = crypto.Encryption(L.CRYPT_LUKS, (0, st.st_size), h).info()
    del data["format"]              # the qcow2 "encrypt" block's own key
    return {"virtual-size": max(0, st.st_size - data["payload-offset"]), "filename": name,
            "format": "luks", "actual-size": st.st_blocks * 512,
            "format-specific": {"type": "luks", "data": data}, "encrypted": True,
            "dirty-flag": False}
