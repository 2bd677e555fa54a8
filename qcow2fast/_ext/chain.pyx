# cython: language_level=3
"""The backing-chain step of the read path, in C: what the layers below a
top image show at a guest range (qemu's bdrv_co_preadv going down
bs->backing, without a call per layer).

A chain is a list of layers, the top's backing file first.  The top reads
through it from layer 0 with the resolved-mapping cache (resolved.pyx):
one lookup answers "which layer, which host offset" at any depth, and a
miss resolves a whole block of units layer by layer (one L2 lookup per
layer and block, stopping where every unit is decided).  A layer of the
chain read on its own (``Image.backing``) reads the layers under it from
its own index, without the cache (``_walk``: one L2 lookup per layer and
run).  Only what a layer's C path cannot read (compressed clusters,
malformed entries) goes to that layer's Python path.

Reads past a layer's end are zeros (qemu: a backing file shorter than
its overlay); the unit a layer ends inside is never cached but walked.

Locking: ``lock`` guards the resolved map (shared for lookups and the
reads they lead to, exclusive to resolve or invalidate); each layer's own
lock is taken one at a time under it, exclusively to load its L2 slices.
Order: the top's lock, this lock, one layer's lock -- never the other way.
A layer file suspended by the descriptor budget (engine/chain.py) is
reopened through ``resume`` with no layer lock held; files are suspended
only under their layer's exclusive lock, so a reader holding a layer's
lock always sees a live descriptor.
"""

from cpython cimport array
from libc.stdint cimport uint64_t, int64_t
from libc.string cimport memset

from .common cimport EXT_DATA, EXT_ZERO, EXT_UNALLOCATED
from .core cimport (ImageCore, qf_rw_new, qf_rw_free, qf_rw_rdlock, qf_rw_tryrdlock,
                    qf_rw_trywrlock, qf_rw_wrlock, qf_rw_unlock)
from .fileio cimport File, NO_FD
from .uring cimport qf_xfer, QF_OP_READ
from .hooks cimport ChainStep
from .resolved cimport (ResolvedMap, rm_meta, RM_BLOCK_BITS, RM_BLOCK_UNITS, RM_PENDING,
                        RM_DATA, RM_ZERO, RM_SLOW, RM_WALK)

# Blocks resolved together on a miss (each layer locked and its L2 slices
# read once for all of them): at most a quarter of the map's slots.
cdef enum:
    RESOLVE_GROUP = 8


cdef inline uint64_t *_ent(uint64_t **blocks, int64_t i) noexcept nogil:
    """Entry ``i`` of a group of blocks."""
    return blocks[i >> RM_BLOCK_BITS] + 2 * (i & (RM_BLOCK_UNITS - 1))


cdef inline int64_t _run(uint64_t *blk, int64_t pos, int g, int64_t n, uint64_t *meta_out,
                         uint64_t *host_out) noexcept nogil:
    """Bytes from guest ``pos``, at most ``n``, that one read serves, from
    the resolved block holding ``pos`` (units of 2**g bytes): its unit and
    the following ones with the same answer (and, for data, contiguous host
    offsets).  ``meta_out``: the answer; ``host_out``: the host offset of
    ``pos`` (for data)."""
    cdef int64_t us = (<int64_t>1) << g, chunk
    cdef int64_t in_u = pos & (us - 1), i = (pos >> g) & (RM_BLOCK_UNITS - 1), end_i = i + 1
    cdef int64_t lim = i + ((in_u + n + us - 1) >> g)
    cdef uint64_t meta = blk[2 * i + 1], want = blk[2 * i] + <uint64_t>us
    meta_out[0] = meta
    host_out[0] = blk[2 * i] + <uint64_t>in_u
    if lim > RM_BLOCK_UNITS:
        lim = RM_BLOCK_UNITS
    while end_i < lim and blk[2 * end_i + 1] == meta and (
            (meta & 0xff) != RM_DATA or blk[2 * end_i] == want):
        end_i += 1
        want += us
    chunk = ((end_i - i) << g) - in_u
    return chunk if chunk < n else n


cdef class ChainCore(ChainStep):
    def __cinit__(self, layers, ResolvedMap rmap):
        """``layers``: the chain, the top's backing file first: qcow2 layers
        (ImageCore) and raw ones (anything with ``file`` and ``size``).
        ``rmap``: the resolved-mapping cache for reads from layer 0, or None."""
        cdef int j
        self.lock = qf_rw_new()
        if self.lock == NULL:
            raise MemoryError()
        self.depth = len(layers)
        self.cores = [l if isinstance(l, ImageCore) else None for l in layers]
        self.files = [None if isinstance(l, ImageCore) else l.file for l in layers]
        self._sizes = array.array("q", [l.size for l in layers] or [0])
        self._last_used = array.clone(array.array("Q"), max(1, self.depth), zero=True)
        self.sizes = <int64_t *>self._sizes.data.as_longlongs
        self.last_used = <uint64_t *>self._last_used.data.as_ulonglongs
        self._io_fd = array.array("i", [-1] * max(1, self.depth))
        self._io_align = array.array("i", [0] * max(1, self.depth))
        self.io_fd = self._io_fd.data.as_ints
        self.io_align = self._io_align.data.as_ints
        for j, l in enumerate(layers):
            self._note_io(j, l)
        self.rmap = rmap
        self.lazy = False
        self.resume = None

    def __dealloc__(self):
        qf_rw_free(self.lock)

    cdef _note_io(self, int j, layer):
        """Note where batch_reads reads layer ``j``'s data: its data file's
        descriptor and O_DIRECT alignment, or -1 when it must be read in
        Python.  Set when the layer joins (open and set up) and again when
        it is replaced (replace_layer, under the exclusive lock); a layer's
        file changes otherwise only when the chain is lazy, where
        batch_reads is not used."""
        f = layer.file if self.cores[j] is None else (
            None if (<ImageCore>layer).s is None or (<ImageCore>layer).s.funnel
            else (<ImageCore>layer).s.data_file)
        self.io_fd[j] = -1
        self.io_align[j] = 0
        if isinstance(f, File) and (<File>f).fd >= 0 and (<File>f).fd != NO_FD:
            self.io_fd[j] = (<File>f).fd
            self.io_align[j] = (<File>f).align if (<File>f).direct else 0

    # -- the step -----------------------------------------------------------------

    cdef int read_below(self, char *buf, int64_t pos, int64_t n, int first) except -1:
        if n <= 0:
            return 0
        if first == 0 and self.rmap is not None:
            return self._read_cached(buf, pos, n)
        return self._walk(buf, pos, n, first)

    cdef int _read_cached(self, char *buf, int64_t pos, int64_t n) except -1:
        cdef ResolvedMap rm = self.rmap
        cdef int g = rm.unit_bits, kind
        cdef int64_t b, chunk
        cdef uint64_t *blk
        cdef uint64_t meta, host
        cdef bint exclusive = False
        if qf_rw_tryrdlock(self.lock) != 0:
            with nogil:
                qf_rw_rdlock(self.lock)
        try:
            while n > 0:
                b = (pos >> g) >> RM_BLOCK_BITS
                blk = rm.find(b)
                if blk == NULL:
                    if not exclusive:
                        qf_rw_unlock(self.lock)
                        with nogil:
                            qf_rw_wrlock(self.lock)
                        exclusive = True
                        continue            # another thread may have resolved it meanwhile
                    self._resolve(b)
                    continue
                chunk = _run(blk, pos, g, n, &meta, &host)
                kind = <int>(meta & 0xff)
                if kind == RM_DATA:
                    self._read_data(<int>(meta >> 8), buf, chunk, host, pos)
                elif kind == RM_ZERO:
                    memset(buf, 0, chunk)
                elif kind == RM_SLOW:
                    self._read_slow(<int>(meta >> 8), buf, pos, chunk)
                else:
                    self._walk(buf, pos, chunk, 0)
                buf += chunk
                pos += chunk
                n -= chunk
        finally:
            qf_rw_unlock(self.lock)
        return 0

    cdef int batch_reads(self, char *buf, int64_t pos, int64_t n, qf_xfer *x,
                         int room) noexcept nogil:
        """The batch engine's read of guest [pos, pos+n) from layer 0 down
        (batch.pyx): its host transfers into ``x[:room]``, zeros filled at
        once.  Returns the number of transfers, BATCH_SLOW where only
        ``read`` can serve it (a block not resolved yet, a layer read in
        Python, an unaligned O_DIRECT transfer, suspended files), or
        BATCH_NO_ROOM.  The caller holds ``lock`` shared until the
        transfers are done (a resolution or invalidation waits for them)."""
        cdef int g, kind, j, m = 0
        cdef int64_t chunk
        cdef uint64_t *blk
        cdef uint64_t meta, host
        if self.lazy or self.rmap is None:
            return BATCH_SLOW
        g = self.rmap.unit_bits
        while n > 0:
            blk = self.rmap.find((pos >> g) >> RM_BLOCK_BITS)
            if blk == NULL:
                return BATCH_SLOW
            chunk = _run(blk, pos, g, n, &meta, &host)
            kind = <int>(meta & 0xff)
            if kind == RM_ZERO:
                memset(buf, 0, chunk)
            elif kind == RM_DATA:
                j = <int>(meta >> 8)
                if self.io_fd[j] < 0 or (self.io_align[j] and (
                        (<uint64_t>buf | <uint64_t>chunk | host) & <uint64_t>(self.io_align[j] - 1))):
                    return BATCH_SLOW
                if m == room:
                    return BATCH_NO_ROOM
                x[m].fd = self.io_fd[j]
                x[m].op = QF_OP_READ
                x[m].buf = buf
                x[m].len = chunk
                x[m].off = <int64_t>host
                x[m].write_max = 0
                m += 1
            else:
                return BATCH_SLOW
            buf += chunk
            pos += chunk
            n -= chunk
        return m

    cdef int _walk(self, char *buf, int64_t pos, int64_t n, int first) except -1:
        """[pos, pos+n) from layer ``first`` down, asking each layer in turn
        (no cache)."""
        cdef int j, kind
        cdef int64_t lim
        cdef uint64_t host
        cdef ImageCore core
        self.walks += 1
        while n > 0:
            j = first
            lim = n
            while True:
                if j >= self.depth or pos >= self.sizes[j]:
                    memset(buf, 0, lim)
                    break
                if pos + lim > self.sizes[j]:
                    lim = self.sizes[j] - pos
                if self.cores[j] is None:
                    (<File>self.files[j]).read_at(buf, lim, pos)
                    break
                core = <ImageCore>self.cores[j]
                self._lock_layer(j)
                try:
                    lim = core._layer_run(pos, lim, &kind, &host)
                finally:
                    qf_rw_unlock(core.rwlock)
                self.layer_lookups += 1
                if kind == EXT_DATA:
                    self._read_data(j, buf, lim, host, pos)
                elif kind == EXT_ZERO:
                    memset(buf, 0, lim)
                elif kind != EXT_UNALLOCATED:
                    self._read_slow(j, buf, pos, lim)
                else:
                    j += 1          # unallocated here: one layer down
                    continue
                break
            buf += lim
            pos += lim
            n -= lim
        return 0

    cdef int _resolve(self, int64_t block) except -1:
        """Resolve ``block`` and the blocks of its group not cached yet
        (RESOLVE_GROUP consecutive blocks, fewer in a small cache): each
        layer is locked, and its L2 slices read, once for the group."""
        cdef ResolvedMap rm = self.rmap
        cdef int64_t g0, b, nb = RESOLVE_GROUP
        cdef uint64_t *blocks[RESOLVE_GROUP]
        cdef int k
        while nb > 1 and nb * 4 > rm.blocks.nslots:
            nb >>= 1
        g0 = block & ~(nb - 1)
        for k in range(nb):
            b = g0 + k
            # The requested block, and those of its group that hold some
            # layer's bytes and are not cached yet.
            blocks[k] = rm.add(b) if b == block or (
                rm.find(b) == NULL and ((b << RM_BLOCK_BITS) << rm.unit_bits) < self._span()) \
                else NULL
        try:
            self._resolve_blocks(g0, blocks, nb)
        except BaseException:
            for k in range(nb):         # never leave a half-resolved block
                if blocks[k] != NULL:
                    rm.discard(g0 + k)
            raise
        return 0

    cdef int _resolve_blocks(self, int64_t b0, uint64_t **blocks, int nb) except -1:
        """Fill the entries of blocks b0.. (``blocks[k]``: block b0+k's
        entries, all RM_PENDING, or NULL if it is cached already): layer by
        layer, each layer asked only about the units still undecided above
        it."""
        cdef int g = self.rmap.unit_bits, j, kind
        cdef int64_t nu = (<int64_t>nb) << RM_BLOCK_BITS
        cdef int64_t u0 = b0 << RM_BLOCK_BITS, i, ib, top, t, k, units, size
        cdef int64_t pending = 0, p, end, r
        cdef uint64_t host, meta
        cdef uint64_t *e
        cdef ImageCore core
        cdef bint locked
        for k in range(nb):
            if blocks[k] != NULL:
                pending += RM_BLOCK_UNITS
        for j in range(self.depth):
            if pending == 0:
                break
            size = self.sizes[j]
            core = <ImageCore>self.cores[j] if self.cores[j] is not None else None
            locked = False
            try:
                i = 0
                while i < nu:
                    if blocks[i >> RM_BLOCK_BITS] == NULL:
                        i += RM_BLOCK_UNITS
                        continue
                    if _ent(blocks, i)[1] != RM_PENDING:
                        i += 1
                        continue
                    ib = i + 1
                    while ib < nu and blocks[ib >> RM_BLOCK_BITS] != NULL and \
                            _ent(blocks, ib)[1] == RM_PENDING:
                        ib += 1
                    # Undecided units [i, ib).  From the layer's end on: zeros,
                    # and the unit it ends inside is walked on each read.
                    top = ib
                    if ((u0 + ib) << g) > size:
                        k = (size >> g) - u0
                        if k < i:
                            k = i
                        for t in range(k, ib):
                            _ent(blocks, t)[1] = rm_meta(j, RM_ZERO)
                        if size & ((1 << g) - 1) and k < ib and ((u0 + k) << g) < size:
                            _ent(blocks, k)[1] = rm_meta(j, RM_WALK)
                        pending -= ib - k
                        top = k
                    if i < top and core is None:            # raw: data where it is
                        for t in range(i, top):
                            e = _ent(blocks, t)
                            e[0] = <uint64_t>((u0 + t) << g)
                            e[1] = rm_meta(j, RM_DATA)
                        pending -= top - i
                    elif i < top:
                        if not locked:
                            self._lock_layer(j)
                            locked = True
                        p = (u0 + i) << g
                        end = (u0 + top) << g
                        while p < end:
                            r = core._layer_run(p, end - p, &kind, &host)
                            self.layer_lookups += 1
                            units = r >> g
                            k = (p >> g) - u0
                            if kind != EXT_UNALLOCATED:
                                meta = rm_meta(j, RM_DATA if kind == EXT_DATA else
                                               RM_ZERO if kind == EXT_ZERO else RM_SLOW)
                                for t in range(units):
                                    e = _ent(blocks, k + t)
                                    e[0] = host + (<uint64_t>t << g) if kind == EXT_DATA else 0
                                    e[1] = meta
                                pending -= units
                            p += r
                    i = ib
            finally:
                if locked:
                    qf_rw_unlock(core.rwlock)
        if pending:
            for i in range(nu):
                if blocks[i >> RM_BLOCK_BITS] != NULL and _ent(blocks, i)[1] == RM_PENDING:
                    _ent(blocks, i)[1] = rm_meta(self.depth, RM_ZERO)    # unallocated all the way down
        return 0

    cdef int64_t _span(self):
        """Guest bytes some layer holds: the largest layer size."""
        cdef int64_t m = 0
        cdef int j
        for j in range(self.depth):
            if self.sizes[j] > m:
                m = self.sizes[j]
        return m

    # -- one layer -------------------------------------------------------------------

    cdef int _lock_layer(self, int j) except -1:
        """Layer j's exclusive lock, its file open."""
        cdef ImageCore core = <ImageCore>self.cores[j]
        if qf_rw_trywrlock(core.rwlock) != 0:
            with nogil:
                qf_rw_wrlock(core.rwlock)
        while core.s.file.fd < 0:
            qf_rw_unlock(core.rwlock)
            self.resume(j)
            with nogil:
                qf_rw_wrlock(core.rwlock)
        self.clock += 1
        self.last_used[j] = self.clock
        return 0

    cdef int _read_data(self, int j, char *buf, int64_t n, uint64_t host,
                        uint64_t guest) except -1:
        cdef ImageCore core
        if self.cores[j] is None:
            return (<File>self.files[j]).read_at(buf, n, host)
        core = <ImageCore>self.cores[j]
        if not self.lazy:               # files never suspended: no lock needed
            return core.s.read_data(buf, n, host, guest)
        core._rdlock_fast()
        while core.s.data_file.fd < 0:
            qf_rw_unlock(core.rwlock)
            self.resume(j)
            core._rdlock_fast()
        self.clock += 1
        self.last_used[j] = self.clock
        try:
            core.s.read_data(buf, n, host, guest)
        finally:
            qf_rw_unlock(core.rwlock)
        return 0

    cdef int _read_slow(self, int j, char *buf, int64_t pos, int64_t n) except -1:
        """Layer j's own public read (its Python path for what C cannot do)."""
        self.slow_reads += 1
        self.cores[j].readinto(pos, memoryview(<unsigned char[:n]> <unsigned char *>buf))
        return 0

    # -- Python interface --------------------------------------------------------------

    def read_into(self, int first, int64_t pos, buf):
        """What layers ``first``.. show at guest [pos, pos+len(buf)) into ``buf``."""
        cdef unsigned char[::1] view = memoryview(buf).cast("B")
        if view.shape[0]:
            self.read_below(<char *>&view[0], pos, view.shape[0], first)

    def invalidate(self, int64_t offset=0, length=None):
        """The one invalidation entry point: a lower layer changed at guest
        [offset, offset+length) (commit writing into it, rebase changing a
        backing file) -- forget what was resolved there.  Call it after the
        change and before the chain is read there again."""
        if self.rmap is None:
            return
        with nogil:
            qf_rw_wrlock(self.lock)
        try:
            self.rmap.invalidate(offset, length)
        finally:
            qf_rw_unlock(self.lock)

    def replace_layer(self, int j, layer):
        """Layer j is now ``layer`` (the same file reopened after it changed);
        the caller invalidates what was resolved through it."""
        with nogil:
            qf_rw_wrlock(self.lock)
        try:
            self.cores[j] = layer if isinstance(layer, ImageCore) else None
            self.files[j] = None if isinstance(layer, ImageCore) else layer.file
            self.sizes[j] = layer.size
            self._note_io(j, layer)
        finally:
            qf_rw_unlock(self.lock)

    def size_of(self, int j):
        return self.sizes[j]

    @property
    def last_used_clock(self):
        """Per layer, when it was last used (a clock, an ``array('Q')``): the
        LRU order of open layer files."""
        return self._last_used
