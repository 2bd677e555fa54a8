from libc.stdint cimport uint64_t, int64_t
from .fileio cimport File
from .cache cimport TableCache
from .allocator cimport RefcountCore

cdef extern from "pthread.h" nogil:
    ctypedef struct pthread_rwlock_t:
        pass
    ctypedef struct pthread_rwlockattr_t:
        pass
    int pthread_rwlock_init(pthread_rwlock_t *, const pthread_rwlockattr_t *)
    int pthread_rwlock_destroy(pthread_rwlock_t *)
    int pthread_rwlock_rdlock(pthread_rwlock_t *)
    int pthread_rwlock_tryrdlock(pthread_rwlock_t *)
    int pthread_rwlock_wrlock(pthread_rwlock_t *)
    int pthread_rwlock_unlock(pthread_rwlock_t *)
    int pthread_rwlockattr_init(pthread_rwlockattr_t *)
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t *, int)
    int PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP

cdef class ImageCore:
    cdef pthread_rwlock_t rwlock
    cdef public File file
    cdef public TableCache l2_cache
    cdef readonly int cluster_bits
    cdef readonly int64_t cluster_size
    cdef readonly int l2_bits
    cdef readonly int slice_bits
    cdef readonly bint extended          # extended L2 entries (subclusters)
    cdef readonly int unit_bits          # allocation unit: subcluster or cluster
    cdef readonly int64_t size
    cdef readonly int64_t host_limit
    cdef public bint read_only
    cdef public bint writethrough
    cdef public bint has_backing
    cdef public bint closed
    cdef public RefcountCore rc          # None when read-only
    cdef public bint alloc_fast          # allocating writes may run in C
    cdef public int64_t zero_from        # host bytes at or past here read as zeros
    cdef public int64_t alloc_end        # end of every cluster handed out
    cdef char *zeros                     # one cluster of zeros (aligned)
    cdef char *scratch                   # two clusters: copy-on-write edges (exclusive lock)
    cdef object _l1
    cdef object _meta
    cdef const unsigned char *meta_bits
    cdef int64_t meta_clusters
    cdef uint64_t *l1
    cdef int64_t l1_size

    cdef inline void _rdlock_fast(self)
    cdef _write(self, int64_t offset, data, bint sync)
    cdef _check_range(self, int64_t offset, int64_t length)
    cdef int64_t _locked_read(self, char *buf, int64_t offset, int64_t n) except -2
    cdef int _slice_at(self, int64_t pos, bint exclusive, uint64_t **l2, int64_t *l2i, int *slot, uint64_t *l1e) except -2
    cdef int64_t _alloc_write(self, const char *buf, int64_t pos, int64_t remaining, uint64_t *l2, int64_t l2i, int64_t run, int slot, bint below) except -2
    cdef int64_t _alloc_write_ext(self, const char *buf, int64_t pos, int64_t remaining, uint64_t *l2, int64_t u, int slot) except -2
    cdef int _fill_below(self, char *dst, int64_t pos, int64_t n) except -1
    cdef void _allocated(self, int slot, int64_t word, int64_t nwords, uint64_t end)
    cdef int _pwrite3(self, const char *a, int64_t na, const char *b, int64_t nb, const char *c, int64_t nc, uint64_t off) except -1
    cdef int64_t _read_loop(self, char *buf, int64_t off, int64_t n, bint exclusive) except -2
    cdef bint _touches_metadata(self, uint64_t host, int64_t n) noexcept nogil
    cdef int64_t _write_loop(self, const char *buf, int64_t off, int64_t n, bint exclusive, bint *allocated) except -2
