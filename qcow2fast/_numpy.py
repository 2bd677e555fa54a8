"""numpy, imported on first use.

Opening an image and the short commands do not need numpy (importing it
costs 40-100 ms, most of a command's start-up); the modules that use it
only for bulk work (a bitmap's scan, a table rewrite, an L2 range set at
once) take ``np`` from here instead of importing it: the first attribute
looked up imports numpy and copies its namespace in, so every later lookup
is a plain attribute lookup.  Nothing here may run numpy at import time.
"""


class _LazyNumpy:
    def __getattr__(self, name):
        import numpy
        self.__dict__.update(numpy.__dict__)
        return getattr(numpy, name)


np = _LazyNumpy()
