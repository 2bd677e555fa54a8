from cpython cimport array
from libc.stdint cimport uint64_t, int64_t
from .core cimport qf_rwlock_t
from .hooks cimport ChainStep
from .resolved cimport ResolvedMap
from .uring cimport qf_xfer

# ChainCore.batch_reads results besides a number of transfers.
cdef enum:
    BATCH_SLOW = -1                      # only the chain's own path reads it
    BATCH_NO_ROOM = -2                   # the transfer array is full


cdef class ChainCore(ChainStep):
    # The layers below a top image, its backing file first: qcow2 layers as
    # ImageCore (``cores[j]``), raw ones by their File (``files[j]``).
    cdef readonly int depth              # number of layers
    cdef list cores
    cdef list files
    cdef array.array _sizes, _last_used, _io_fd, _io_align    # never resized: the
                                         # pointers below point in
    cdef int64_t *sizes                  # guest bytes of each layer: past them, zeros
    cdef uint64_t *last_used             # per layer, a clock value: LRU of open files
    cdef int *io_fd                      # per layer, the descriptor batch_reads reads its
                                         # data from, or -1: read in Python (encrypted,
                                         # blkdebug, no descriptor)
    cdef int *io_align                   # per layer, O_DIRECT's alignment, or 0
    cdef uint64_t clock
    cdef readonly ResolvedMap rmap       # resolved mappings from layer 0 down, or None
    cdef qf_rwlock_t *lock               # guards rmap: lookups shared, resolution exclusive
    cdef public bint lazy                # layer files may be suspended (engine/chain.py)
    cdef public object resume            # (j): reopen layer j's suspended file
    cdef public uint64_t layer_lookups, walks, slow_reads

    cdef int _read_cached(self, char *buf, int64_t pos, int64_t n) except -1
    cdef int batch_reads(self, char *buf, int64_t pos, int64_t n, qf_xfer *x,
                         int room) noexcept nogil
    cdef int _walk(self, char *buf, int64_t pos, int64_t n, int first) except -1
    cdef int _resolve(self, int64_t block) except -1
    cdef int _resolve_blocks(self, int64_t b0, uint64_t **blocks, int nb) except -1
    cdef int _read_data(self, int j, char *buf, int64_t n, uint64_t host, uint64_t guest) except -1
    cdef int _read_slow(self, int j, char *buf, int64_t pos, int64_t n) except -1
    cdef int _lock_layer(self, int j) except -1
    cdef int64_t _span(self)
    cdef _note_io(self, int j, layer)
