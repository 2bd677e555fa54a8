"""The external data file's header parts (qcow2.txt "External data file
name" extension, incompatible bit 2, autoclear bit 1): what they say, read
and written in one place (no I/O).

- incompatible bit 2 ``INCOMPAT_DATA_FILE``: guest data lives in another
  file; every host offset of an L2 entry is an offset in it, and the
  image's refcounts describe only the image file.
- autoclear bit 1 ``AUTOCLEAR_DATA_FILE_RAW``: that file is also a valid
  raw image of the guest disk (guest offset == data file offset, zeros
  written there too).  A program that does not know the bit clears it.
- extension 0x44415441 (``EXT_DATA_FILE``): the file's name, not NUL
  terminated.  Optional: without it the name must be given when opening.
"""

from ..errors import CorruptImageError, InvalidArgumentError, UnsupportedFeatureError
from .header import (AUTOCLEAR_DATA_FILE_RAW, EXT_DATA_FILE, INCOMPAT_DATA_FILE,
                     HeaderExtension)

# No path a host can open is longer (Linux PATH_MAX, terminator included).
MAX_DATA_FILE_NAME = 4095


def has_data_file(h):
    return bool(h.incompatible_features & INCOMPAT_DATA_FILE)


def is_raw(h):
    return bool(h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)


def data_file_name(h):
    """The data file name the image stores, or None.  Raises
    CorruptImageError (field ``data_file``) for a name no host can open:
    empty, too long, a NUL byte in it, or not UTF-8."""
    for ext in h.other_extensions:
        if ext.type == EXT_DATA_FILE:
            return _decode(ext.data)
    return None


def _decode(raw):
    def bad(why):
        raise CorruptImageError(f"external data file name (header extension "
                                f"{EXT_DATA_FILE:#x}) {why}", field="data_file")
    if not raw:
        bad("is empty")
    if len(raw) > MAX_DATA_FILE_NAME:
        bad(f"is {len(raw)} bytes, longer than {MAX_DATA_FILE_NAME}")
    if b"\0" in raw:
        bad(f"has a NUL byte at position {raw.index(0)} of {len(raw)}")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        pass
    bad("is not valid UTF-8")


def check_header(h, override):
    """qemu's rules on the data file bits at open (``override``: a data
    file given by the caller, or None)."""
    if has_data_file(h):
        if h.version < 3:       # (the bit does not exist in v2)
            return
        if data_file_name(h) is None and override is None:
            raise UnsupportedFeatureError(
                "'data-file' is required for this image: it has the external data file bit "
                f"but no data file name extension ({EXT_DATA_FILE:#x})", feature="data_file")
        return
    if override is not None:
        raise InvalidArgumentError("'data-file' can only be set for images with an external "
                                   "data file")
    if is_raw(h):
        raise CorruptImageError("data-file-raw requires a data file (autoclear bit 1 set "
                                "without incompatible bit 2)", field="autoclear_features")


def set_data_file(h, name, raw):
    """Make header ``h`` name the data file ``name`` (``raw``: the raw bit).
    An empty name takes the name out and keeps the bit (qemu's amend -o
    data_file=): the image then opens only with a data file given."""
    data = name.encode() if isinstance(name, str) else bytes(name)
    if data:
        _decode(data)
    h.incompatible_features |= INCOMPAT_DATA_FILE
    if raw:
        h.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW
    h.other_extensions = [e for e in h.other_extensions if e.type != EXT_DATA_FILE]
    if data:
        h.other_extensions.insert(0, HeaderExtension(EXT_DATA_FILE, data))


def validate_create(name, raw, version, backing_file):
    """qemu-img create's rules and messages for data_file/data_file_raw."""
    if raw and not name:
        raise InvalidArgumentError("data-file-raw requires data-file")
    if not name:
        return
    if version < 3:
        raise InvalidArgumentError("External data files are only supported with "
                                   "compatibility level 1.1 and above (use version=v3 or greater)")
    if raw and backing_file:
        raise InvalidArgumentError("Backing file and data-file-raw cannot be used at the "
                                   "same time")
    try:
        _decode(name.encode())
    except CorruptImageError as e:
        raise InvalidArgumentError(str(e).replace("(header extension 0x44415441) ", "")) \
            from None
