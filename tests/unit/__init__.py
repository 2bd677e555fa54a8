"""Unit tests per subsystem: header, geometry, refcount growth, the metadata
cache, host files and the model-free kernels."""
