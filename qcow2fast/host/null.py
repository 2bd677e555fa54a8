"""qemu's ``null-co`` and ``null-aio`` protocol drivers (block/null.c): a
device of a given size that stores nothing.  Writes are dropped; reads
return zeros.  Named ``null-co://`` (the only file name the driver
allows), ``json:{"driver": "null-co", "size": N, "read-zeroes": true}``
or ``--image-opts driver=null-co,size=N``.  A sink for ``convert`` and
``dd`` that measures the reading side alone, and a backing file that
reads as zeros.

qemu reports its blocks as allocated but not data, and as zero only with
``read-zeroes=on`` (without it, qemu leaves a read buffer as it was; here
a read returns zeros either way, one of the contents qemu allows)."""

from ..errors import InvalidArgumentError
from ..extent import Extent

DRIVERS = ("null-co", "null-aio")
FILENAMES = tuple(d + "://" for d in DRIVERS)
DEFAULT_SIZE = 1 << 30                  # block/null.c: 1 GiB
OPTIONS = ("driver", "filename", "size", "read-zeroes", "latency-ns")
STRONG = ("size", "read-zeroes")        # null_strong_runtime_opts: they name the device


def is_null_name(name):
    return isinstance(name, str) and name in FILENAMES


class NullImage:
    """The block-device interface (host/device.py) over nothing."""

    header = None
    backing = None

    def __init__(self, driver="null-co", *, size=DEFAULT_SIZE, read_zeroes=False,
                 writable=False, fmt=None, path=None):
        """``fmt``: the format qemu shows (the driver's name, or "raw" for a
        null-co:// file name, raw over the protocol); ``path``: the name
        qemu shows (``driver://``, or a json: name when options name it)."""
        if driver not in DRIVERS:
            raise InvalidArgumentError(f"Unknown driver '{driver}'")
        self.format = fmt or driver
        self.path = path or driver + "://"
        self.size = size
        self.read_zeroes = read_zeroes
        self.read_only = not writable
        self.closed = False

    @classmethod
    def from_options(cls, options, *, writable=False, fmt=None, json_name=None):
        """From qemu's option names (a json: node or --image-opts pairs,
        values as given there: numbers or strings).  ``json_name(dict)``
        makes the name of a device its options name (qemu's
        null_refresh_filename: one with only driver, filename or
        latency-ns set is ``driver://``)."""
        unknown = [key for key in options if key not in OPTIONS]
        if unknown:
            raise InvalidArgumentError(
                f"Block protocol '{options.get('driver', DRIVERS[0])}' doesn't support "
                f"the option '{unknown[0]}'")
        driver = options.get("driver", DRIVERS[0])
        name = options.get("filename")
        if name is not None and name != driver + "://":
            raise InvalidArgumentError(
                f"The only allowed filename for this driver is '{driver}://'")
        strong = {key: options[key] for key in STRONG if key in options}
        path = json_name({"driver": driver, **strong}) if strong and json_name else None
        return cls(driver, size=_number(options, "size", DEFAULT_SIZE),
                   read_zeroes=_flag(options, "read-zeroes"), writable=writable, fmt=fmt,
                   path=path)

    def read(self, offset, length):
        return bytes(max(0, min(length, self.size - offset)))

    def readinto(self, offset, buf):
        mv = memoryview(buf).cast("B")
        mv[:] = bytes(len(mv))
        return len(mv)

    def write(self, offset, data):
        if self.read_only:
            raise InvalidArgumentError(f"{self.path} is open read-only")
        return len(memoryview(data).cast("B"))

    def write_zeroes(self, offset, length, *, may_unmap=False):
        self.write(offset, b"")

    def flush(self):
        pass

    def block_status(self, offset=0, length=None):
        """One extent: zero with read-zeroes, otherwise allocated data (what
        qemu's convert and map make of an allocated, non-zero block)."""
        end = self.size if length is None else min(self.size, offset + length)
        if end <= offset:
            return []
        kind = "zero" if self.read_zeroes else "unallocated"
        return [Extent(offset, end - offset, kind, None, 0)]

    @property
    def backing_chain(self):
        return [self.path]

    def close(self):
        self.closed = True


def _number(options, key, default):
    value = options.get(key, default)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"Parameter '{key}' expects a non-negative number "
                                   "below 2^64")
    return value


def _flag(options, key):
    value = options.get(key, False)
    if isinstance(value, bool):
        return value
    if value in ("on", "true"):
        return True
    if value in ("off", "false"):
        return False
    raise InvalidArgumentError(f"Parameter '{key}' expects 'on' or 'off'")
