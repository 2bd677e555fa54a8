# Types the stubs share (a stub-only module: there is nothing to import at run time).
import sys
from typing import Any, Union

import numpy as np
from typing_extensions import TypeAlias

# Any object exporting a contiguous buffer (bytes, bytearray, memoryview,
# mmap, array, numpy arrays).
if sys.version_info >= (3, 12):
    from collections.abc import Buffer as Buffer
else:
    import typing_extensions

    # numpy's stubs make ndarray a Buffer only from Python 3.12.
    Buffer: TypeAlias = Union[typing_extensions.Buffer, np.ndarray[Any, Any]]
