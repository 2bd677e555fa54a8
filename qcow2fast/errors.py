"""The qcow2fast exception hierarchy.

Every error about an image's format or about how it is used derives from
:class:`Qcow2Error`.  Operating-system errors (ENOENT, EACCES, ENOSPC, ...)
stay :class:`OSError` so callers can handle them the usual way.
"""

import contextlib

__all__ = [
    "Qcow2Error",
    "CorruptImageError",
    "UnsupportedFeatureError",
    "InvalidArgumentError",
    "ReadOnlyImageError",
    "ImageClosedError",
    "LimitExceededError",
    "RepairError",
    "ConvertError",
    "ImageLockedError",
    "UntrustedImageError",
    "LeakWarning",
    "RepairWarning",
    "qemu_step",
]


class Qcow2Error(Exception):
    """Base class of every qcow2fast error."""


class CorruptImageError(Qcow2Error):
    """The image's metadata is malformed or inconsistent.

    ``offset`` is the byte offset in the image file of the offending
    structure or field when one is known, ``field`` its name in the spec.
    ``qemu`` is qemu's own message for the same condition, when it has one
    (the command line prints it, as qemu-img does); else None.
    """

    def __init__(self, message, *, offset=None, field=None, qemu=None):
        where = []
        if field is not None:
            where.append(field)
        if offset is not None:
            where.append(f"at offset {offset:#x}")
        if where:
            message = f"{' '.join(where)}: {message}"
        super().__init__(message)
        self.offset = offset
        self.field = field
        self.qemu = qemu


class UnsupportedFeatureError(Qcow2Error):
    """The image uses a feature this version of qcow2fast cannot handle."""

    def __init__(self, message, *, feature=None):
        super().__init__(message)
        self.feature = feature


class InvalidArgumentError(Qcow2Error, ValueError):
    """An argument or option given by the caller is invalid."""


class ReadOnlyImageError(Qcow2Error, PermissionError):
    """A write was attempted on an image opened read-only (or marked corrupt)."""


class ImageClosedError(Qcow2Error, ValueError):
    """An operation was attempted on a closed image."""


class LimitExceededError(Qcow2Error):
    """A structure would outgrow a limit of the format or of qemu's
    implementation (the refcount table's size, the refcount width, the
    host offsets a compressed cluster descriptor can hold)."""


class RepairError(Qcow2Error):
    """A repair (``check -r``) could not be carried out."""


class ConvertError(Qcow2Error):
    """Reading a source of a conversion failed; the message names the source
    and the offset."""


class ImageLockedError(Qcow2Error):
    """Another process (qemu, or another qcow2fast) holds the image in a
    way that forbids this open: qemu's image locks (host/lock.py).
    ``path`` is the file, ``detail`` the message without its context."""

    def __init__(self, message, *, path=None, detail=None):
        super().__init__(message)
        self.path = path
        self.detail = detail if detail is not None else message


class UntrustedImageError(Qcow2Error):
    """An image opened with ``untrusted=True`` asks for something an
    untrusted image may not (a backing or data file outside its directory,
    a protocol name, more memory or work than the bounds allow)."""


class SnapshotNotFoundError(InvalidArgumentError):
    """No internal snapshot has the id or name asked for."""
    qemu = "Can't find snapshot"       # qemu's words (bdrv_snapshot_load_tmp)


class MissingSecretError(InvalidArgumentError):
    """An encrypted image opened for I/O without ``key_secret``."""


class BadPassphraseError(Qcow2Error):
    """No LUKS key slot opens with the passphrase given."""


class LeakWarning(UserWarning):
    """An operation succeeded but left clusters allocated that nothing uses
    (``qemu-img check`` reports them as leaks; ``check -r leaks`` frees
    them).  ``qemu_message`` is what qemu-img prints in the same case."""

    def __init__(self, message, qemu_message):
        super().__init__(message)
        self.qemu_message = qemu_message


class RepairWarning(UserWarning):
    """An image found dirty (written with lazy refcounts and not closed)
    was checked and repaired as it was opened for writing, as qemu repairs
    it (check -r all).  ``qemu_lines`` are what qemu prints meanwhile."""

    def __init__(self, message, qemu_lines):
        super().__init__(message)
        self.qemu_lines = qemu_lines


@contextlib.contextmanager
def qemu_step(what):
    """An OSError raised inside carries ``qemu_step``: qemu's words for the
    step of an operation that failed ("Failed to free the cluster and L1
    table"), which a command prints before the errno's, as qemu-img does.
    The innermost step names it."""
    try:
        yield
    except OSError as e:
        if getattr(e, "qemu_step", None) is None:
            e.qemu_step = what
        raise
