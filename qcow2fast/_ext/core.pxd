from libc.stdint cimport uint64_t, int64_t
from .fileio cimport File
from .state cimport ImageState
from .allocator cimport RefcountCore
from .hooks cimport ChainStep

cdef extern from "qf_rwlock.h" nogil:
    # A writer-preferring reader-writer lock whose readers share no cache
    # line (csrc/qf_rwlock.h); the waiting calls are made without the GIL.
    ctypedef struct qf_rwlock_t:
        pass
    qf_rwlock_t *qf_rw_new()
    void qf_rw_free(qf_rwlock_t *)
    int qf_rw_rdlock(qf_rwlock_t *)
    int qf_rw_tryrdlock(qf_rwlock_t *)
    int qf_rw_wrlock(qf_rwlock_t *)
    int qf_rw_trywrlock(qf_rwlock_t *)
    int qf_rw_unlock(qf_rwlock_t *)


cdef class ImageCore:
    cdef qf_rwlock_t *rwlock
    cdef ImageState s                    # the image's state (None until set up)
    cdef RefcountCore rc                 # the allocator (None when read-only)

    # The backing-chain step of the read path: the chain below this image
    # (chain.ChainCore, shared by all its layers), read from its layer
    # ``chain_first`` down; None without a backing file.
    cdef ChainStep chain_step
    cdef int chain_first
    cdef object resume_file              # (): reopen a suspended image file (deep chains)

    # Write observers (hooks.WriteObserver): told of every range about to change.
    cdef list observers

    # Hooks into the Python subsystems for what the C path hands over (each
    # called with no lock held; set by _core_setup):
    cdef object read_fallback            # (offset, memoryview): the rest of a read
    cdef object write_fallback           # (offset, memoryview): the rest of a write
    cdef object ordered_flush            # (): the full flush after an allocating
                                         #     write under writethrough
    cdef object overlap_found            # (host): marks the image corrupt and raises

    cdef char *zeros                     # one cluster of zeros (aligned)
    cdef char *scratch                   # two clusters: copy-on-write edges (exclusive lock)

    cdef inline void _rdlock_fast(self)
    cdef int _notify(self, int64_t offset, int64_t n) except -1
    cdef _write(self, int64_t offset, data, bint sync)
    cdef _check_range(self, int64_t offset, int64_t length)
    cdef int64_t _locked_read(self, char *buf, int64_t offset, int64_t n) except -2
    cdef int64_t _layer_run(self, int64_t pos, int64_t n, int *kind, uint64_t *host) except -2
    cdef int _slice_at(self, int64_t pos, bint exclusive, uint64_t **l2, int64_t *l2i, int *slot, uint64_t *l1e) except -2
    cdef int _slice_load(self, int64_t pos, int64_t key, uint64_t **l2, int64_t *l2i, int *slot) except -2
    cdef int64_t _alloc_write(self, const char *buf, int64_t pos, int64_t remaining, uint64_t *l2, int64_t l2i, int64_t run, int slot, bint below) except -2
    cdef int64_t _alloc_write_ext(self, const char *buf, int64_t pos, int64_t remaining, uint64_t *l2, int64_t u, int slot) except -2
    cdef int _fill_below(self, char *dst, int64_t pos, int64_t n) except -1
    cdef void _allocated(self, int slot, int64_t word, int64_t nwords, uint64_t end,
                         bint ordered=*)
    cdef int _pwrite3(self, const char *a, int64_t na, const char *b, int64_t nb, const char *c, int64_t nc, uint64_t off, uint64_t guest) except -1
    cdef int64_t _read_loop(self, char *buf, int64_t off, int64_t n, bint exclusive) except -2
    cdef int64_t _write_loop(self, const char *buf, int64_t off, int64_t n, bint exclusive, bint *allocated) except -2
