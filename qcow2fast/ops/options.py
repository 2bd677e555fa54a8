"""The options of a new qcow2 image (qemu-img's -o options), validated once
for create, measure and convert, with qemu's rules and messages."""

import os
from typing import NamedTuple, Optional

from ..engine.backing import probe_format, resolve_backing_path
from ..errors import InvalidArgumentError
from ..host import file as hostfile
from ..spec import header as hdr
from ..spec.constants import L1E_SIZE
from ..spec.geometry import Geometry

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
# qemu 7.2's qcow2 options (create's and amend's), with their -o help text.
QCOW2_OPTION_HELP = {
    "backing_file": ("str", "File name of a base image"),
    "backing_fmt": ("str", "Image format of the base image"),
    "cluster_size": ("size", "qcow2 cluster size"),
    "compat": ("str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    "compression_type": ("str", "Compression method used for image cluster compression"),
    "data_file": ("str", "File name of an external data file"),
    "data_file_raw": ("bool (on/off)", "The external data file must stay valid as a raw image"),
    "encrypt.cipher-alg": ("str", "Name of encryption cipher algorithm"),
    "encrypt.cipher-mode": ("str", "Name of encryption cipher mode"),
    "encrypt.format": ("str", "Encrypt the image, format choices: 'aes', 'luks'"),
    "encrypt.hash-alg": ("str", "Name of encryption hash algorithm"),
    "encrypt.iter-time": ("num", "Time to spend in PBKDF in milliseconds"),
    "encrypt.ivgen-alg": ("str", "Name of IV generator algorithm"),
    "encrypt.ivgen-hash-alg": ("str", "Name of IV generator hash algorithm"),
    "encrypt.key-secret": ("str", "ID of secret providing qcow AES key or LUKS passphrase"),
    "encrypt.keyslot": ("num", "Select a single keyslot to modify explicitly"),
    "encrypt.new-secret": ("str",
                           "New secret to set in the matching keyslots. Empty string to erase"),
    "encrypt.old-secret": ("str", "Select all keyslots that match this password"),
    "encrypt.state": ("str", "Select new state of affected keyslots (active/inactive)"),
    "encryption": ("bool (on/off)", "Encrypt the image with format 'aes'. (Deprecated in favor "
                   "of encrypt.format=aes)"),
    "extended_l2": ("bool (on/off)", "Extended L2 tables"),
    "lazy_refcounts": ("bool (on/off)", "Postpone refcount updates"),
    "preallocation": ("str", "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    "refcount_bits": ("num", "Width of a reference count entry in bits"),
    "size": ("size", "Virtual disk size"),
}
AMEND_ONLY = ("encrypt.keyslot", "encrypt.new-secret", "encrypt.old-secret", "encrypt.state")
# The block drivers qemu-img 7.2 knows besides qcow2 and raw (its --help,
# "Supported formats"), and those of them that cannot create an image.
QEMU_DRIVERS = (
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
    "copy-on-read", "dmg", "file", "ftp", "ftps", "gluster", "host_cdrom", "host_device",
    "http", "https", "iscsi", "iser", "luks", "nbd", "nfs", "null-aio", "null-co", "nvme",
    "parallels", "preallocate", "qcow", "qed", "quorum", "rbd", "replication",
    "snapshot-access", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat")
QEMU_NO_CREATE = (
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
    "copy-on-read", "dmg", "ftp", "ftps", "http", "https", "null-aio", "null-co", "preallocate",
    "quorum", "replication", "snapshot-access", "throttle", "vvfat")
# qemu's advice after a v3-only option on a v2 image
V3 = "(use version=v3 or greater)"


class Settings(NamedTuple):
    """Validated creation options (what a new image's header says)."""
    size: int
    version: int
    cluster_bits: int
    refcount_order: int
    compression_type: int
    lazy_refcounts: bool
    backing_file: Optional[str]
    backing_format: Optional[str]
    preallocation: str
    extended_l2: bool = False

    def geometry(self):
        return Geometry(self.cluster_bits, self.refcount_order, extended_l2=self.extended_l2)

    def header(self, **fields):
        """A Header for these settings (size 0 unless given in ``fields``)."""
        h = hdr.Header(version=self.version, cluster_bits=self.cluster_bits,
                       refcount_order=self.refcount_order,
                       compression_type=self.compression_type,
                       backing_file=self.backing_file or None,
                       backing_format=self.backing_format, **fields)
        if self.version == 3:
            if self.lazy_refcounts:
                h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
            if self.compression_type != hdr.COMPRESSION_ZLIB:
                h.incompatible_features |= hdr.INCOMPAT_COMPRESSION
            if self.extended_l2:
                h.incompatible_features |= hdr.INCOMPAT_EXTL2
        else:
            h.header_length = hdr.V2_HEADER_LENGTH
        return h


def validate_options(path, size=None, *, cluster_size=65536, compat="1.1", refcount_bits=16,
                     lazy_refcounts=False, backing_file=None, backing_format=None,
                     compression_type="zlib", preallocation="off", extended_l2=False,
                     size_known=True, measuring=False):
    """Check create()'s options as qemu does; returns :class:`Settings`.
    ``size_known=False`` skips the size checks (a stream of unknown length);
    ``measuring``: qemu-img measure's words where they differ."""
    cluster_bits = _log2(cluster_size)
    if cluster_bits is None or not hdr.MIN_CLUSTER_BITS <= cluster_bits <= hdr.MAX_CLUSTER_BITS:
        raise InvalidArgumentError("Cluster size must be a power of two between "
                                   f"{1 << hdr.MIN_CLUSTER_BITS} and "
                                   f"{(1 << hdr.MAX_CLUSTER_BITS) // 1024}k")
    if compat in ("0.10", "v2", 2):
        version = 2
    elif compat in ("1.1", "v3", 3):
        version = 3
    else:
        raise InvalidArgumentError(f"Parameter 'version' does not accept value '{compat}'")
    refcount_order = _log2(refcount_bits)
    if refcount_order is None or refcount_order > 6:
        raise InvalidArgumentError("Refcount width must be a power of two and may not exceed "
                                   "64 bits")
    if version == 2 and refcount_bits != 16:
        raise InvalidArgumentError("Different refcount widths than 16 bits require "
                                   f"compatibility level 1.1 or above {V3}")
    if version == 2 and lazy_refcounts:
        raise InvalidArgumentError("Lazy refcounts only supported with compatibility level 1.1 "
                                   f"and above {V3}")
    ctype = {v: k for k, v in hdr.COMPRESSION_NAMES.items()}.get(compression_type)
    if ctype is None:
        raise InvalidArgumentError("Parameter 'compression-type' does not accept value "
                                   f"'{compression_type}'")
    if version == 2 and ctype != hdr.COMPRESSION_ZLIB:
        raise InvalidArgumentError("Non-zlib compression type is only supported with "
                                   f"compatibility level 1.1 and above {V3}")
    if extended_l2 and version < 3:
        raise InvalidArgumentError("Extended L2 entries are only supported with compatibility "
                                   f"level 1.1 and above {V3}")
    if extended_l2 and cluster_bits < hdr.MIN_EXTL2_CLUSTER_BITS:
        raise InvalidArgumentError("Extended L2 entries are only supported with cluster sizes "
                                   f"of at least {1 << hdr.MIN_EXTL2_CLUSTER_BITS} bytes")
    if preallocation not in PREALLOCATION_MODES:
        raise InvalidArgumentError(f"Parameter 'preallocation' does not accept value "
                                   f"'{preallocation}'")
    if backing_file == "":
        raise InvalidArgumentError("Expected backing file name, got empty string")
    if backing_format is not None and not backing_file:
        raise InvalidArgumentError("Backing format cannot be used without backing file")
    if backing_file and preallocation != "off" and not extended_l2:
        # (with extended L2 entries a preallocated cluster has no subcluster
        # allocated: it reads from the backing file until written)
        raise InvalidArgumentError("Backing file and preallocation can only be used at the "
                                   "same time if extended_l2 is on")
    if backing_file and "\0" in backing_file:
        # no valid image has one (the header parser refuses it)
        raise InvalidArgumentError("backing file name contains a NUL byte")
    if backing_file:
        bpath = resolve_backing_path(path, backing_file)
        if backing_format is None:
            backing_format = probe_format(bpath)
        if size is None and size_known:
            size = image_size(bpath, backing_format)
    if backing_file and len(backing_file.encode()) > hdr.MAX_BACKING_FILE_SIZE:
        raise InvalidArgumentError(f"backing file name longer than {hdr.MAX_BACKING_FILE_SIZE} "
                                   "bytes")
    if size_known:
        if size is None:
            raise InvalidArgumentError("size is required without a backing file")
        if size < 0:
            raise InvalidArgumentError(f"size must not be negative ({size})")
        size = -(-int(size) // 512) * 512
        geo = Geometry(cluster_bits, refcount_order, extended_l2=extended_l2)
        if geo.l1_size_for(size) > hdr.MAX_L1_BYTES // L1E_SIZE:
            raise InvalidArgumentError("The image size is too large "
                                       + ("" if measuring else "for file format 'qcow2' ")
                                       + "(try using a larger cluster size)")
    return Settings(size, version, cluster_bits, refcount_order, ctype, bool(lazy_refcounts),
                    backing_file or None, backing_format, preallocation, bool(extended_l2))


def image_size(path, fmt):
    if fmt == "qcow2":
        from ..engine.image import Image
        # (shared: qemu-img create reads the size of a backing file a running
        # VM writes, bdrv_img_create's force-share)
        with Image(path, "r", backing=False, cache_clean_interval=0, no_io=True,
                   force_share=True) as img:
            return img.size
    fd = os.open(path, os.O_RDONLY)
    try:
        return hostfile.size(fd)        # block devices too
    finally:
        os.close(fd)


def _log2(value):
    """log2 of a power of two; None for anything else."""
    value = int(value)
    if value <= 0 or value & (value - 1):
        return None
    return value.bit_length() - 1
