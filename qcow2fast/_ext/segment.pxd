# The batch engine's segments (batch.pyx): requests resolved from the cached
# L2 slices (and, below the image, the chain's resolved map) into host
# transfers under the image's shared lock, and carried out together.  The
# requests, their states, and the resolution; batch.pyx is the API around
# them (submit, readv_into, timed_batches).  Inline: cimported by batch.pyx
# only, never copied.
from libc.stdint cimport int64_t, uint64_t, INT64_MIN
from libc.string cimport memset

from .chain cimport ChainCore, BATCH_NO_ROOM
from .common cimport (l2_units_run, EXT_DATA, EXT_ZERO, EXT_UNALLOCATED, QF_WRITE_MAX,
                      SC_BITS, qf_write_piece)
from .core cimport ImageCore, qf_rw_rdlock, qf_rw_unlock
from .fileio cimport NO_FD
from .l2slice cimport slice_lookup, SLICE_OK, L1_UNALLOCATED
from .state cimport ImageState
from .uring cimport QF_RING_ENTRIES, QF_OP_READ, QF_OP_WRITE, qf_xfer, qf_xfer_batch

cdef enum:
    OP_READ = 0
    OP_WRITE = 1

# Req.res before the request is done.
cdef extern from *:
    """
    #define QF_REQ_PENDING INT64_MIN
    #define QF_REQ_SLOW (INT64_MIN + 1)
    #define QF_REQ_FAILED (INT64_MIN + 2)
    """
    const int64_t PENDING "QF_REQ_PENDING"
    const int64_t SLOW "QF_REQ_SLOW"          # for the one-request path
    const int64_t FAILED "QF_REQ_FAILED"      # its exception is in the results list

cdef struct Req:
    int op                      # OP_READ or OP_WRITE
    int64_t off, len
    char *buf
    int64_t res                 # length done, -errno, or one of the states above
    int first, nx               # its transfers in the segment's array
    bint held                   # its Py_buffer is held

cdef enum:
    NO_ROOM = BATCH_NO_ROOM     # resolve(): the segment's transfer array is full




cdef inline bint _overlap(int64_t a, int64_t an, int64_t b, int64_t bn) noexcept nogil:
    return a < b + bn and b < a + an


cdef inline bint _conflicts(Req *r, int seg, int k) noexcept nogil:
    """Whether request k must wait for a pending request of the segment
    [seg, k): they touch the same guest bytes and one writes, or the same
    memory and one (a read) fills it."""
    cdef int j
    for j in range(seg, k):
        if r[j].res != PENDING:
            continue
        if (r[j].op == OP_WRITE or r[k].op == OP_WRITE) and _overlap(r[j].off, r[j].len,
                                                                r[k].off, r[k].len):
            return True
        if (r[j].op == OP_READ or r[k].op == OP_READ) and _overlap(<int64_t>r[j].buf, r[j].len,
                                                              <int64_t>r[k].buf, r[k].len):
            return True
    return False


cdef inline int _resolve(ImageState s, Req *q, qf_xfer *x, int room, bint below,
                         ChainCore chain) noexcept nogil:
    """Resolve request ``q`` into host transfers ``x[:room]`` (reads of
    zeros are filled at once).  Returns the number of transfers, SLOW (as
    an int: -1) when only the one-request path can serve it, or NO_ROOM.
    The caller holds the shared lock; ``below``: the image has a backing
    chain (unallocated reads need it); ``chain``: that chain when its
    reads can be resolved here too (see _chain_of), its lock held shared."""
    cdef int64_t done = 0, pos, l2i, key, count, run, chunk, in_u, piece
    cdef int ub = s.unit_bits, kind, slot, st, m = 0, nx
    cdef int64_t us = (<int64_t>1) << ub
    cdef int64_t slice_units = (<int64_t>1) << s.slice_unit_bits
    cdef uint64_t host, l1e, desc
    cdef uint64_t *l2
    cdef bint write = q.op == OP_WRITE
    cdef size_t wmax = 0 if s.data_file.direct else QF_WRITE_MAX
    cdef int fd = s.data_file.fd
    if fd < 0 or fd == NO_FD:
        return -1                   # suspended (the one-request path resumes it) or no
                                    # descriptor (a remote file: only c_pread reads it)
    if not write:
        fd = s.data_file.read_fd()  # this thread's own (csrc/qf_readfd.h)
    while done < q.len:
        pos = q.off + done
        in_u = pos & (us - 1)
        st = slice_lookup(s, pos, &l2, &l2i, &slot, &l1e, &key)
        if st == L1_UNALLOCATED and not write and (not below or chain is not None):
            chunk = (((pos >> (s.l2_bits + s.cluster_bits)) + 1)
                     << (s.l2_bits + s.cluster_bits)) - pos
            if chunk > q.len - done:
                chunk = q.len - done
            if below:
                nx = chain.batch_reads(q.buf + done, pos, chunk, x + m, room - m)
                if nx < 0:
                    return nx       # BATCH_SLOW (SLOW) or BATCH_NO_ROOM (NO_ROOM)
                m += nx
            else:
                memset(q.buf + done, 0, chunk)
            done += chunk
            continue
        if st != SLICE_OK:
            return -1
        count = (in_u + (q.len - done) + us - 1) >> ub
        if count > slice_units - l2i:
            count = slice_units - l2i
        run = l2_units_run(l2, l2i, count, s.cluster_bits, s.extended, write, &kind, &host)
        chunk = (run << ub) - in_u
        if chunk > q.len - done:
            chunk = q.len - done
        if kind == EXT_DATA:
            if host + <uint64_t>(run << ub) > <uint64_t>s.host_limit:
                return -1
            if write:
                desc = l2[2 * (l2i >> SC_BITS)] if s.extended else l2[l2i]
                if not (desc >> 63) or s.touches_metadata(host + in_u, chunk):
                    return -1       # shared (copy-on-write) or corrupt: the slow path
            if s.data_file.direct and not s.data_file.aligned(q.buf + done, chunk, host + in_u):
                return -1
            while chunk > 0:
                if m == room:
                    return NO_ROOM
                piece = chunk if (not write or wmax == 0) else \
                    <int64_t>qf_write_piece(host + in_u, chunk, wmax)     # (sector-whole)
                x[m].fd = fd
                x[m].op = QF_OP_WRITE if write else QF_OP_READ
                x[m].buf = q.buf + done
                x[m].len = piece
                x[m].off = host + in_u
                x[m].write_max = wmax
                m += 1
                done += piece
                in_u += piece
                chunk -= piece
            continue
        if not write and kind == EXT_UNALLOCATED and chain is not None:
            nx = chain.batch_reads(q.buf + done, pos, chunk, x + m, room - m)
            if nx < 0:
                return nx
            m += nx
            done += chunk
            continue
        if write or not (kind == EXT_ZERO or (kind == EXT_UNALLOCATED and not below)):
            return -1
        memset(q.buf + done, 0, chunk)
        done += chunk
    return m


cdef inline int _segments(ImageCore img, ImageState s, Req *r, int n, int k, qf_xfer *x,
                          bint below, ChainCore chain) noexcept nogil:
    """Run requests k, k+1, ... of ``img`` (state ``s``) segment by segment
    until the end (returns n) or a request for the one-request path
    (returns its index, res SLOW)."""
    cdef int seg, nx, m, j, i
    cdef int64_t res
    while k < n:
        if r[k].res != PENDING:
            k += 1
            continue
        qf_rw_rdlock(img.rwlock)
        if chain is not None:       # (the top's lock first: chain.pyx's order)
            qf_rw_rdlock(chain.lock)
        seg = k
        nx = 0
        while k < n:
            if r[k].res != PENDING:
                k += 1
                continue
            if k > seg and _conflicts(r, seg, k):
                break
            m = _resolve(s, &r[k], x + nx, QF_RING_ENTRIES - nx, below, chain)
            if m == NO_ROOM and nx > 0:
                break
            if m < 0:
                r[k].res = SLOW
                break
            r[k].first = nx
            r[k].nx = m
            nx += m
            k += 1
        if nx:
            qf_xfer_batch(x, nx, s.data_file.direct)
        if chain is not None:
            qf_rw_unlock(chain.lock)
        qf_rw_unlock(img.rwlock)
        for j in range(seg, k):
            if r[j].res != PENDING:
                continue
            res = r[j].len
            for i in range(r[j].first, r[j].first + r[j].nx):
                if x[i].res < 0:
                    res = x[i].res
                    break
            r[j].res = res
        if k < n and r[k].res == SLOW:
            return k
    return n
