# The batch engine's host transfers (csrc/qf_uring.h): made by batch.pyx
# and, for reads through a backing chain, by chain.pyx.
from libc.stdint cimport int64_t

cdef extern from "qf_uring.h" nogil:
    int QF_RING_ENTRIES
    int QF_OP_READ
    int QF_OP_WRITE
    ctypedef struct qf_xfer:
        int fd
        int op
        char *buf
        int64_t len
        int64_t off
        int64_t res
        size_t write_max
    int qf_xfer_batch(qf_xfer *x, int n, int direct)
