"""Amending an image's options (qemu's qcow2_amend_options, qemu-img
amend): compat, refcount_bits, lazy_refcounts, size, and backing_file /
backing_fmt when they name what the image already has.

Everything qemu would refuse is refused before the image is written:
unknown options, options only ``create`` takes (cluster_size,
compression_type, ...), encryption options on an image without
encryption, a backing file that differs (that is rebase's job), lazy
refcounts or a refcount width other than 16 bits with compat=0.10, a
refcount that the new width cannot hold, a downgrade that v2 cannot
express.  The steps then run in qemu's order -- upgrade, refcount width,
lazy refcounts, size, downgrade -- each with its own crash-safe write
order (engine/compat.py, engine/refcount_order.py, engine/resize.py);
the image is reopened between the steps that change its geometry or
version.
"""

import os

from ..engine import compat, features, refcount_order
from ..engine.image import Image
from ..errors import InvalidArgumentError, ReadOnlyImageError, UnsupportedFeatureError
from ..spec import header as hdr
from ..spec.datafile import is_raw, set_data_file
from .options import AMEND_ONLY, QCOW2_OPTION_HELP

# qemu 7.2's amend options for qcow2 (qemu-img amend -o help), with their help.
AMEND_OPTIONS = [(name, *QCOW2_OPTION_HELP[name]) for name in (
    "backing_file", "backing_fmt", "compat", "data_file", "data_file_raw", "encrypt.iter-time",
    *AMEND_ONLY, "lazy_refcounts", "refcount_bits", "size")]
AMEND_NAMES = {name for name, _, _ in AMEND_OPTIONS}
# qcow2 options that only image creation takes.
CREATE_ONLY = {"cluster_size", "compression_type", "extended_l2", "preallocation", "encryption",
               "encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg",
               "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg",
               "encrypt.hash-alg"}
VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}


class AmendOptionError(InvalidArgumentError):
    """An option amend does not take; ``hint`` is qemu's second line."""

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.hint = hint


def parse_options(options):
    """Check option names and value types as qemu-img does once the image
    is open; returns {name: value} with typed values."""
    out = {}
    for key, value in options.items():
        if key not in AMEND_NAMES:
            raise AmendOptionError(f"Invalid parameter '{key}'",
                                   "This option is only supported for image creation"
                                   if key in CREATE_ONLY else None)
        if key == "refcount_bits" and not isinstance(value, int):
            try:
                value = int(value, 0)
            except (TypeError, ValueError):
                raise InvalidArgumentError("Parameter 'refcount_bits' expects a number") from None
        elif key in ("lazy_refcounts", "data_file_raw") and not isinstance(value, bool):
            v = str(value).lower() if value is not None else "on"
            if v not in ("on", "off", "true", "false", "yes", "no", "1", "0"):
                raise InvalidArgumentError(f"Parameter '{key}' expects 'on' or 'off'")
            value = v in ("on", "true", "yes", "1")
        elif key == "size" and not isinstance(value, int):
            raise InvalidArgumentError("Parameter 'size' expects a size in bytes")
        out[key] = value
    return out


def amend(path, options, *, progress=None, key_secret=None, force=False, data_file=None):
    """Change the options of the qcow2 image at ``path`` (qemu-img amend):
    ``options`` maps option names to values (strings as ``-o`` gives them,
    or ints and bools).  ``progress(done, total)`` is called as the work
    advances (the refcount walks and the zero-cluster expansion).  An
    encrypted image is opened with ``key_secret``; its key slots change
    with the ``encrypt.*`` options (engine/luks_amend.py; ``force`` as
    qemu-img amend --force).  ``data_file``: the external data file to use
    instead of the one the image names (--image-opts data-file.filename)."""
    path = os.fspath(path)
    if not options:
        raise InvalidArgumentError("Must specify options (-o)")
    open_kw = {"cache_clean_interval": 0, "key_secret": key_secret, "data_file": data_file}
    img = Image(path, "r+", backing=False, **open_kw)
    try:
        opts = parse_options(options)       # (after the open, as qemu-img: its errors first)
        plan = _plan(img, opts, force)
    except BaseException:
        img.close()
        raise
    # qemu counts the key-slot change as an operation, though it reports
    # no progress of its own (qcow2_amend_options).
    report = _Progress(progress, sum(1 for k in ("upgrade", "downgrade", "keyslots")
                                     if plan.get(k)) + (plan.get("order") is not None))
    try:
        if plan.get("keyslots") is not None:
            _step(img, "changing the key slots", plan["keyslots"])
        if plan.get("upgrade"):
            _step(img, "the upgrade to compat=1.1", compat.upgrade, img, report.step())
        if plan.get("order") is not None:
            old = _step(img, "changing refcount_bits", refcount_order.change_refcount_order,
                        img, plan["order"], report.step())
            img.close()
            img = Image(path, "r+", backing=False, **open_kw)
            _step(img, "freeing the old refcount structures",
                  refcount_order.free_old_structures, img, old)
        if plan.get("lazy") is not None:
            _step(img, "setting lazy_refcounts", _set_lazy_refcounts, img, plan["lazy"])
        if plan["clear_raw"]:               # (before a new name, as qemu)
            _step(img, "clearing data_file_raw", _clear_data_file_raw, img)
        if opts.get("data_file") is not None:     # a new name for the data file (qemu)
            _step(img, "setting data_file", _set_data_file, img, opts["data_file"])
        if plan.get("size") is not None:
            img.close()         # with its backing file: growing may have to hide it
            img = Image(path, "r+", **open_kw)
            img.resize(plan["size"], shrink=True)
        if plan.get("downgrade"):
            _step(img, "the downgrade to compat=0.10", compat.downgrade, img, report.step())
    finally:
        img.close()


def _plan(img, opts, force=False):
    """What to do, every refusal made first (nothing is written here)."""
    h = img.header
    if img.read_only:
        raise ReadOnlyImageError(img.state.read_only_reason())
    keyslots = None
    if any(key.startswith("encrypt.") for key in opts):
        from ..engine import luks_amend     # (hashlib, the LUKS code: only when asked for)
        keyslots = luks_amend.plan(img, opts, force)
    if opts.get("data_file") is not None and not img.state.external_data:
        raise InvalidArgumentError("data-file can only be set for images that use an external "
                                   "data file")
    raw = opts.get("data_file_raw")
    if raw and not is_raw(h):           # (on when it is on already: nothing to do)
        raise InvalidArgumentError("data-file-raw cannot be set on existing images")
    version = h.version
    if "compat" in opts and opts["compat"] is not None:
        version = VERSIONS.get(str(opts["compat"]))
        if version is None:
            raise InvalidArgumentError(f"Unknown compatibility level {opts['compat']}")
    bits = opts.get("refcount_bits", h.refcount_bits)
    if bits <= 0 or bits > 64 or bits & (bits - 1):
        raise InvalidArgumentError("Refcount width must be a power of two and may not exceed "
                                   "64 bits")
    if bits != h.refcount_bits and version < 3 and bits != 16:
        raise InvalidArgumentError("Refcount widths other than 16 bits require compatibility "
                                   "level 1.1 or above (use compat=1.1 or greater)")
    if "backing_file" in opts or "backing_fmt" in opts:
        if (opts.get("backing_file") != h.backing_file
                or opts.get("backing_fmt") != h.backing_format):
            raise AmendOptionError("Cannot amend the backing file",
                                   "You can use 'qemu-img rebase' instead.")
    lazy = opts.get("lazy_refcounts")
    current_lazy = bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS)
    if lazy and version < 3:
        raise InvalidArgumentError("Lazy refcounts only supported with compatibility level "
                                   "1.1 and above (use compat=1.1 or greater)")
    plan = {"upgrade": version > h.version, "downgrade": version < h.version,
            "lazy": lazy if lazy is not None and lazy != current_lazy else None,
            "order": None, "size": None, "keyslots": keyslots,
            "clear_raw": raw is False and is_raw(h)}
    if bits != h.refcount_bits:
        refcount_order.refuse_blocks_past_end(img.refcounts, img.geo)    # (before any write)
        order = bits.bit_length() - 1
        if order < h.refcount_order:
            refcount_order.refuse_narrowing(refcount_order.all_refcounts(img.refcounts, img.geo),
                                            img.geo.cluster_bits, bits)
        plan["order"] = order
    size = opts.get("size")
    if size:                    # (0: keep, as qemu)
        if size % 512:
            raise InvalidArgumentError("The new size must be a multiple of 512")
        if h.nb_snapshots and max(version, h.version) < 3:     # (the upgrade comes first)
            raise UnsupportedFeatureError("Can't resize a v2 image which has snapshots",
                                          feature="snapshots")
        if size != img.size:
            plan["size"] = size
    if plan["downgrade"]:
        # v2 snapshots record no disk size: each must have the size the
        # image will have (qemu's rule)
        problem = compat.downgrade_problems(img, lambda: _has_compressed(img), bits,
                                            plan["size"])
        if problem:
            raise UnsupportedFeatureError(problem, feature="compat")
    return plan


def _step(img, what, operation, *args):
    """One amend step; raising part-way stops the image's writes and leaves
    it dirty (features.steps)."""
    with features.steps(img.state, f"amend: {what}"):
        return operation(*args)


def _set_data_file(img, name):
    old_length = len(img.header.pack())
    set_data_file(img.header, name, is_raw(img.header))
    features.write_header(img.state, old_length)
    img.state.barrier()


def _clear_data_file_raw(img):
    """The data file stops being a raw image of the disk: from now on only
    the L2 tables say where guest data is (qemu keeps the data file)."""
    img.header.autoclear_features &= ~hdr.AUTOCLEAR_DATA_FILE_RAW
    features.write_header_field(img.state, "autoclear_features")
    img.state.barrier()


def _has_compressed(img):
    return any(e.kind == "compressed" for e in img.clusters.layer_extents(0, img.size))


def _set_lazy_refcounts(img, on):
    """The compatible bit of lazy refcounts (qemu marks the image clean
    before clearing it: the refcounts are then all on disk)."""
    s, h = img.state, img.header
    img.flusher.flush(sync=True, final=True)
    if features.is_dirty(s):
        features.set_dirty(s, False)
    if on:
        h.compatible_features |= hdr.COMPAT_LAZY_REFCOUNTS
    else:
        h.compatible_features &= ~hdr.COMPAT_LAZY_REFCOUNTS
    features.write_header_field(s, "compatible_features")
    s.barrier()


class _Progress:
    """qemu's amend progress (qcow2_amend_helper_cb): each operation reports
    ``(offset, work size)`` in its own units; the figure passed on is the
    work done so far over the work of the operations done and this one,
    projected over those still to come.  An operation's work size may grow
    as it runs (more refcount walks), so the figure may go back."""

    def __init__(self, progress, operations):
        self.progress, self.operations = progress, max(operations, 1)
        self.completed = self.offset_completed = self.last_size = 0
        self.current = self.last = None

    def step(self):
        """The reporting function of the next operation (None without
        ``progress``)."""
        if self.progress is None:
            return None
        op = object()

        def report(offset, size):
            if op is not self.last:
                if self.last is not None:
                    self.offset_completed += self.last_size
                    self.completed += 1
                self.last = op
            self.last_size = size
            current = self.offset_completed + size
            projected = current * (self.operations - self.completed - 1) // (self.completed + 1)
            self.progress(self.offset_completed + offset, current + projected)
        return report
