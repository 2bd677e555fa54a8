"""qcow2fast: read and write QEMU qcow2 images fast.

    import qcow2fast
    qcow2fast.create("disk.qcow2", 10 << 30)
    with qcow2fast.open("disk.qcow2", "r+") as img:
        img.write(0, b"hello")
        img.read(0, 5)

The public names are loaded on first use (PEP 562): ``import qcow2fast`` and
a command line that only reads a header pay for neither the engine nor
numpy (tests/unit/test_startup.py).
"""

from __future__ import annotations

import os as _os
import sys as _sys
from typing import TYPE_CHECKING

# numpy's OpenBLAS would start a thread per CPU at import, each reserving
# tens of MiB of address space (64 CPUs: more than the 1 GiB qemu-img is
# given for untrusted images, host/limits.py); qcow2fast does no linear
# algebra.  A program that does can set OPENBLAS_NUM_THREADS itself.  Set
# here, before any module of the package can import numpy.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

if TYPE_CHECKING:
    import os
    from typing import Any, Literal

    from .engine.image import Image
    from .errors import (ConvertError, CorruptImageError, ImageClosedError, ImageLockedError,
                         InvalidArgumentError, LeakWarning, LimitExceededError, Qcow2Error,
                         ReadOnlyImageError, RepairError, RepairWarning,
                         UnsupportedFeatureError, UntrustedImageError)
    from .extent import Extent
    from .ops.amend import amend
    from .ops.commit import commit
    from .ops.convert import convert
    from .ops.create import create
    from .ops.rebase import rebase

__version__ = "0.1.0"

__all__ = ["open", "create", "convert", "commit", "rebase", "amend", "Image", "Extent", "Qcow2Error", "CorruptImageError",
           "UnsupportedFeatureError", "InvalidArgumentError", "ReadOnlyImageError",
           "ImageClosedError", "LimitExceededError", "RepairError", "ConvertError",
           "ImageLockedError", "UntrustedImageError", "LeakWarning", "RepairWarning"]

# Each lazily loaded public name -> the module defining it.
_LAZY = {"amend": ".ops.amend", "commit": ".ops.commit", "convert": ".ops.convert",
         "create": ".ops.create", "rebase": ".ops.rebase", "Image": ".engine.image",
         "Extent": ".extent",
         **dict.fromkeys(("ConvertError", "CorruptImageError", "ImageClosedError",
                          "ImageLockedError", "InvalidArgumentError", "LeakWarning",
                          "LimitExceededError",
                          "Qcow2Error", "ReadOnlyImageError", "RepairError", "RepairWarning",
                          "UnsupportedFeatureError", "UntrustedImageError"), ".errors")}


def __getattr__(name: str) -> Any:
    from ._lazy import lazy_attribute
    return lazy_attribute(__name__, _LAZY, globals(), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def open(  # noqa: A001 - mirrors the builtin on purpose
        path: str | os.PathLike[str], mode: Literal["r", "r+"] = "r", **options: Any) -> Image:
    """Open a qcow2 image (``mode`` "r" or "r+"); see :class:`Image` for options."""
    from .engine.image import Image
    return Image(path, mode, **options)
