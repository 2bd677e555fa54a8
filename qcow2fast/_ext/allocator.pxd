from libc.stdint cimport uint8_t, uint64_t, int64_t
from .cache cimport TableCache

cdef class RefcountCore:
    cdef public TableCache cache
    cdef object _table
    cdef object _table_view             # the exported buffer behind ``tbl``
    cdef uint64_t *tbl
    cdef readonly int64_t table_size
    cdef readonly int order, rb_bits, cluster_bits
    cdef readonly uint64_t maxval
    cdef public int64_t free_hint        # every cluster below it is in use
    cdef public int64_t end_cluster      # no cluster at or past it is in use
    cdef readonly int64_t missing_block  # set when c_alloc needs a new block
    cdef object _reserved
    cdef object _reserved_view          # the exported buffer behind ``res``
    cdef const uint8_t *res
    cdef int64_t res_len

    cdef int _slot(self, int64_t t) except -2
    cdef int64_t c_next_free(self, int64_t c) except -2
    cdef int64_t c_free_run_at(self, int64_t c, int64_t want) except -2
    cdef int64_t c_find_free_run(self, int64_t n) except -2
    cdef int64_t c_update(self, int64_t cluster, int64_t n, int64_t delta) except -2
    cdef int64_t c_alloc(self, int64_t n) except -2
