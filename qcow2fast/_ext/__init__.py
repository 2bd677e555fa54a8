"""Cython kernels of qcow2fast (built from the .pyx files here)."""
