"""External data files (qemu's ``data-file`` and ``data-file-raw``: the
``has_data_file``/``data_file_is_raw`` branches of block/qcow2.c,
qcow2-cluster.c and qcow2-refcount.c).

The data file is the host-offset translation hook of the data path:
``ImageState.set_data_file`` makes every L2 entry's host offset address it,
so the C path reads and writes guest data through its descriptor, while
the header, the tables and the refcounts stay in the image file.  As in
qemu 7.2:

- a guest cluster is always placed at its own guest offset in the data
  file (host offset == guest offset), and data clusters have no refcounts
  (the image's refcounts describe only the image file), so allocating one
  touches no metadata but its L2 entry;
- a guest discard (or write-zeroes that may unmap) punches the cluster out
  of the data file; the cluster a copy-on-write replaces is the same one,
  never freed;
- with ``data_file_raw`` the data file is a raw image of the disk: every L2
  entry is allocated at create and resize (preallocation=metadata at
  least), and zeros are written into the data file before the L2 entries
  that say "zero" (qcow2_cluster_zeroize);
- reading past the data file's end gives zeros (file-posix pads short
  reads), so a data file shorter than the mapping reads as zeros there;
- compressed clusters are refused (writing) and an error (reading), and
  internal snapshots are refused ("Operation not supported").

Write ordering: data is written to the data file, then the data barrier
(``ImageState.barrier``) syncs the data file before the image file, so the
data is stable before any L2 entry written after the barrier points at it.
A punch happens before the L2 entry stops pointing at the cluster: a crash
in between leaves the old entry reading zeros, which is what the discard
or the zeroing asked for.  Not so in an encrypted image: zeros there
decrypt to noise, neither the old data nor zeros, so its data file is
never punched or zeroed (``DataFile.keep``; qemu punches it, and a crash
in that window shows noise): the old ciphertext stays until the cluster
is written again, and the L2 entry alone says what the guest reads.

Name resolution: a relative name is resolved against the image's directory,
like a backing file name (qemu 7.2 resolves it against the current
directory, which is the same when qemu runs in the image's directory);
a name given when opening (``open(..., data_file=path)``, ``--image-opts
data-file.filename=``) is taken as is.
"""

import os

from ..errors import CorruptImageError, UnsupportedFeatureError
from ..host.file import open_image_file
from ..spec import datafile as spec
from ..spec.constants import DATA, L2E_OFFSET_MASK, ZERO
from ..spec.luks import CRYPT_NONE
from .._ext.kernels import l2_entry_kind
from . import untrusted as untrusted_rules
from .backing import resolve_backing_path

# Where an L2 entry of an image with a data file may point: anywhere the
# offset field can say (past the data file's end reads as zeros).
HOST_LIMIT = L2E_OFFSET_MASK + 1


def resolve(image_path, name):
    """The data file ``name`` of the image at ``image_path`` as a path."""
    return resolve_backing_path(image_path, name)


def display_name(image_path, h, override):
    """The data file's name as qemu-img prints it (map's File column): the
    name given when opening, else the stored one joined to the image's
    directory as given (qemu's path_combine)."""
    if override is not None:
        return os.fspath(override)
    name = spec.data_file_name(h)
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(image_path), name)


def open_data_file(image_path, h, override, *, writable, direct, force_share, locking,
                   untrusted, no_io=False, blkdebug=None):
    """The File of the external data file of the image at ``image_path``
    (header ``h``), or None when it has none.  ``override``: a path given
    by the caller, used instead of the name in the image.  ``no_io``: an
    image whose data file has no name opens without it (qemu-img info).
    ``blkdebug``: the rules of qemu's blkdebug filter over the data file."""
    if no_io and override is None and spec.has_data_file(h) and spec.data_file_name(h) is None:
        return None
    spec.check_header(h, override)
    if not spec.has_data_file(h):
        return None
    name = spec.data_file_name(h)
    if override is not None:
        path = os.fspath(override)
    else:
        if untrusted:
            untrusted_rules.check_file_name(image_path, name, "external data file")
        path = resolve(image_path, name)
    try:
        return open_image_file(path, "raw", writable=writable, direct=direct,
                               force_share=force_share, locking=locking, blkdebug=blkdebug)
    except FileNotFoundError:
        shown = repr(os.fspath(override)) if override is not None else repr(name)
        raise FileNotFoundError(2, f"could not open external data file {shown} of "
                                f"{image_path!r} (field data_file)", path) from None


def refuse_snapshots(name):
    """qemu refuses internal snapshots of an image with a data file (its
    qemu-img snapshot message)."""
    raise UnsupportedFeatureError(f"Could not create snapshot '{name}': -95 (Operation not "
                                  "supported)", feature="data_file")


class DataFile:
    """The data-file half of the allocator: given the image's state."""

    def __init__(self, state):
        self.state = state
        self.raw = spec.is_raw(state.header)
        # encrypted: the data file's clusters are never punched or zeroed
        # (module doc: zeros read through an old L2 entry would decrypt to noise)
        self.keep = state.header.crypt_method != CRYPT_NONE

    @property
    def file(self):
        return self.state.data_file

    def alloc(self, guest, n):
        """Host offset of ``n`` new clusters for guest clusters from
        ``guest`` (cluster aligned): the same offset (qemu's
        do_alloc_cluster_offset)."""
        return guest

    def release(self, entry, discard):
        """An L2 entry stops pointing at its cluster.  A discard (guest
        discard, write-zeroes with unmap, shrink) punches the cluster out
        of the data file; anything else keeps it (no refcounts here)."""
        kind = l2_entry_kind(entry, True)
        if not discard or kind not in (DATA, ZERO) or self.keep:
            return
        host = entry & L2E_OFFSET_MASK
        if host or kind == DATA:
            self.file.punch_hole(host, self.state.cluster_size)

    def zero(self, offset, length):
        """data_file_raw: make guest [offset, offset+length) of the data file
        read as zeros, before the L2 entries say so."""
        if not self.raw or length <= 0 or self.keep:
            return
        f = self.file
        end = min(offset + length, max(f.size(), offset))
        if end <= offset or f.punch_hole(offset, end - offset) or \
                f.zero_range(offset, end - offset):
            return
        zeros = memoryview(bytes(min(end - offset, 1 << 20)))
        for pos in range(offset, end, len(zeros)):
            self.state.write_data_pieces([zeros[:min(len(zeros), end - pos)]], pos, pos)

    def resize(self, new_size, preallocation):
        """The data file follows the disk, as qcow2_co_truncate: cut or
        extended to exactly the new size (a regular file) when growing
        without preallocation and when shrinking."""
        f = self.file
        if f.is_device or preallocation != "off":
            return
        f.truncate(new_size)
        # (bytes past the new end read as zeros, grown or cut)
        self.state.zero_from = min(self.state.zero_from, new_size)

    def grow_to(self, end, mode):
        """Preallocation: the data file covers host bytes below ``end``
        (qemu's preallocate_co extends it to the last allocated cluster)."""
        f = self.file
        if f.is_device or f.size() >= end:
            return
        if mode in ("falloc", "full"):
            f.fallocate(f.size(), end - f.size())
        else:
            f.truncate(end)


def refuse_compressed(entry, where):
    """A compressed L2 entry in an image with a data file (qemu:
    qcow2_get_host_offset's corruption report)."""
    raise CorruptImageError(f"compressed cluster entry {entry:#x} found in an image with an "
                            "external data file", offset=where, field="L2 entry")
