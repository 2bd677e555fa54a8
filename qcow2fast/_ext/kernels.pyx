# cython: language_level=3
"""Kernels over metadata tables, callable from Python (the mapping and
refcount layers).  Each is a plain function over arrays: no file policy."""

cimport numpy as cnp
from libc.stdint cimport uint8_t, uint64_t, int64_t

from .common cimport l2_run, rc_get, rc_set
from .common cimport l2_entry_kind as l2_entry_kind_c

cnp.import_array()

# Extent kinds (same values as common.pxd's enum).
UNALLOCATED, DATA, ZERO, COMPRESSED, INVALID = 0, 1, 2, 3, 4


def l2_next_run(const uint64_t[::1] l2, int64_t i, int64_t count, int cluster_bits,
                bint need_copied=False):
    """(kind, host_offset, n): the run of entries starting at ``i`` (at most
    ``count``) sharing the first one's kind; data runs are host-contiguous."""
    cdef int kind
    cdef uint64_t host
    cdef int64_t n
    if count <= 0 or i < 0 or i + count > l2.shape[0]:
        raise IndexError("l2_next_run: range outside the slice")
    with nogil:
        n = l2_run(&l2[0], i, count, cluster_bits, need_copied, &kind, &host)
    return kind, host, n


def refcount_get(const uint8_t[::1] blk, int64_t i, int order):
    return rc_get(&blk[0], i, order)


def refcount_set(uint8_t[::1] blk, int64_t i, int order, uint64_t value):
    rc_set(&blk[0], i, order, value)


def refcount_decode(const uint8_t[::1] blk, int order, uint64_t[::1] out):
    """Decode every entry of a refcount block into ``out``."""
    cdef int64_t i, n = out.shape[0]
    cdef const uint8_t *p = &blk[0]
    if n * (1 << order) > blk.shape[0] * 8:
        raise ValueError("refcount_decode: output larger than the block")
    with nogil:
        for i in range(n):
            out[i] = rc_get(p, i, order)


def refcount_encode(const uint64_t[::1] values, int order, uint8_t[::1] blk):
    """Encode ``values`` (each checked to fit by the caller) into a block."""
    cdef int64_t i, n = values.shape[0]
    cdef uint8_t *p = &blk[0]
    if n * (1 << order) > blk.shape[0] * 8:
        raise ValueError("refcount_encode: more values than the block holds")
    with nogil:
        for i in range(n):
            rc_set(p, i, order, values[i])


def l2_entry_kind(uint64_t entry):
    """Kind (UNALLOCATED/DATA/ZERO/COMPRESSED/INVALID) of one L2 entry."""
    return l2_entry_kind_c(entry)
