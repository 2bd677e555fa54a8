"""A C library bound with cffi in ABI mode (``ffi.dlopen``: no headers, no
build step), loaded on first use, once, whichever thread asks first; the
binding of engine/libcrypto.py and engine/libnettle.py."""

import ctypes.util
import threading

from ..errors import UnsupportedFeatureError


class CffiLibrary:
    """``cdef``: the declarations used; ``name``: the library's short name
    (``ctypes.util.find_library``), ``soname`` the file tried without it;
    ``needed_for`` and ``feature`` make the error when it does not load."""

    def __init__(self, cdef, name, soname, needed_for, feature):
        self._cdef, self._name, self._soname = cdef, name, soname
        self._needed_for, self._feature = needed_for, feature
        self._lock = threading.Lock()
        self._loaded = None

    def load(self):
        """(ffi, lib)."""
        with self._lock:
            if self._loaded is None:
                import cffi
                ffi = cffi.FFI()
                ffi.cdef(self._cdef)
                name = ctypes.util.find_library(self._name) or self._soname
                try:
                    lib = ffi.dlopen(name)
                except OSError as e:
                    raise UnsupportedFeatureError(f"{self._needed_for} needs {name}: {e}",
                                                  feature=self._feature) from None
                self._loaded = ffi, lib
        return self._loaded
