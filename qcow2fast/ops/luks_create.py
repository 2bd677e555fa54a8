"""A new raw LUKS volume, qemu's ``luks`` format (block/crypto.c): the LUKS
header and keyslot 0 at the start of the file, the payload (``size`` bytes,
encrypted sectors) at the header's payload offset.  As ``qemu-img create -f
luks`` makes it: the payload is not written (a hole).

Order (a crash leaves no volume that claims a slot it lacks): key material,
barrier, then the header marks slot 0 active (engine/luks.store_key); the
file takes its full size last."""

import os

from ..engine import luks
from ..host import file as hostfile
from ..spec import luks as L


def create_luks(path, size, passphrase, *, iter_time=L.DEFAULT_ITER_TIME_MS, **choice):
    """Create the volume ``path`` of ``size`` payload bytes, slot 0 opened by
    ``passphrase`` (an engine.secret.Secret); ``choice``: cipher_alg,
    cipher_mode, ivgen_alg, ivgen_hash_alg, hash_alg (qemu's defaults)."""
    h, key = luks.new_header(iter_time=iter_time, **choice)
    payload = h.payload_offset * L.SECTOR_SIZE
    hostfile.create_raw(path, payload)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        luks.store_key(h, 0, passphrase, key, iter_time,
                       lambda at, data: hostfile.pwrite_all(fd, data, at, path),
                       lambda: os.fsync(fd))
        hostfile.set_size(fd, payload + size, path)
        os.fsync(fd)
    finally:
        os.close(fd)
