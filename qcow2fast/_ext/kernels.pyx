# cython: language_level=3
"""Kernels over metadata tables, callable from Python (the mapping and
refcount layers).  Each is a plain function over arrays: no file policy."""

from libc.stdint cimport UINT32_MAX, uint8_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcmp

from .common cimport (L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, QCOW_OFLAG_COMPRESSED,
                     QCOW_OFLAG_COPIED, QF_BSWAP64, SC_ALLOC_MASK, SC_BITS, SC_ZERO_SHIFT,
                     SUBCLUSTERS, l2_units_run, qcow2_coffset_mask, qcow2_csize_mask,
                     qcow2_csize_shift, rc_get, rc_set)
from .common cimport l2_entry_kind as l2_entry_kind_c
from .common cimport at_host0, EXT_DATA


def l2_next_run(const uint64_t[::1] l2, int64_t i, int64_t count, int cluster_bits,
                bint need_copied=False, bint extended=False, bint data0=False):
    """(kind, host_offset, n): the run of allocation units -- entries, or
    subclusters with ``extended`` L2 entries -- starting at ``i`` (at most
    ``count``) sharing the first one's kind; data runs are host-contiguous."""
    cdef int kind
    cdef uint64_t host
    cdef int64_t n, units = (l2.shape[0] // 2) * SUBCLUSTERS if extended else l2.shape[0]
    if count <= 0 or i < 0 or i + count > units:
        raise IndexError("l2_next_run: range outside the slice")
    with nogil:
        n = l2_units_run(&l2[0], i, count, cluster_bits, extended, need_copied, &kind, &host,
                         data0)
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


def refcount_count_used(const uint8_t[::1] blk, int order, int64_t n):
    """How many of the first ``n`` entries of a refcount block are nonzero."""
    cdef int64_t i, used = 0
    cdef const uint8_t *p = &blk[0]
    if n < 0 or n * (1 << order) > blk.shape[0] * 8:
        raise ValueError("refcount_count_used: more entries than the block holds")
    with nogil:
        for i in range(n):
            used += rc_get(p, i, order) != 0
    return used


def refcount_encode(const uint64_t[::1] values, int order, uint8_t[::1] blk):
    """Encode ``values`` (each checked to fit by the caller) into a block."""
    cdef int64_t i, n = values.shape[0]
    cdef uint8_t *p = &blk[0]
    if n * (1 << order) > blk.shape[0] * 8:
        raise ValueError("refcount_encode: more values than the block holds")
    with nogil:
        for i in range(n):
            rc_set(p, i, order, values[i])


def l2_entry_kind(uint64_t entry, bint data0=False):
    """Kind (an EXT_* value, qcow2fast.spec.constants.Kind) of one L2 entry
    (``data0``: of an image with an external data file, see common.pxd)."""
    if at_host0(entry, data0):
        return EXT_DATA
    return l2_entry_kind_c(entry)


cdef inline void tally_one(uint32_t *counts, int64_t c) noexcept nogil:
    # Tallies saturate at UINT32_MAX: a cluster would need 4 billion
    # references (32 GiB of L2 entries) to get there.
    if counts[c] != UINT32_MAX:
        counts[c] += 1


def tally_add(uint32_t[::1] counts, const int64_t[::1] clusters):
    """counts[c] += 1 (saturating) for every c of ``clusters`` (each checked in range)."""
    cdef Py_ssize_t i, n = clusters.shape[0], limit = counts.shape[0]
    cdef int64_t c
    with nogil:
        for i in range(n):
            c = clusters[i]
            if c < 0 or c >= limit:
                with gil:
                    raise IndexError(f"tally_add: cluster {c} outside [0, {limit})")
            tally_one(&counts[0], c)


# -- check: whole L2 tables at a time ------------------------------------------------


def l2_tally_tables(const uint64_t[:, ::1] tables, uint32_t[::1] counts, uint8_t[::1] odd,
                    int cluster_bits, uint64_t file_size, bint extended=False):
    """qemu's check_refcounts_l2 for the tables (rows of on-disk, big-endian
    words) with nothing to report.

    A row holding an entry check must report on (reserved bits, a
    misaligned or past-EOF data cluster, a compressed cluster with COPIED
    starting at or past EOF or running a cluster or more past it, a cluster
    outside ``counts``)
    gets ``odd[row] = 1`` and is left alone: the caller checks it entry by
    entry.  With ``extended`` entries (descriptor, subcluster bitmap), a
    bitmap qemu's check reports on makes the row odd too.  Every other row
    adds its clusters to ``counts``.  Returns the rows' (allocated,
    compressed, fragmented) clusters as qemu counts them."""
    cdef Py_ssize_t r, i, j, rows = tables.shape[0], n = tables.shape[1]
    cdef Py_ssize_t limit = counts.shape[0], step = 2 if extended else 1
    cdef uint64_t cs = 1ULL << cluster_bits, e, off, end, nxt, bm = 0
    cdef int csize_shift = qcow2_csize_shift(cluster_bits)
    cdef uint64_t csize_mask = qcow2_csize_mask(cluster_bits)
    cdef uint64_t coff_mask = qcow2_coffset_mask(cluster_bits)
    cdef int64_t allocated = 0, compressed = 0, fragmented = 0, c, last
    cdef bint bad
    if odd.shape[0] < rows:
        raise ValueError("l2_tally_tables: odd[] shorter than the table count")
    with nogil:
        for r in range(rows):
            bad = False
            for j in range(n // step):
                i = j * step
                e = QF_BSWAP64(tables[r, i])
                if extended:
                    bm = QF_BSWAP64(tables[r, i + 1])
                if e & QCOW_OFLAG_COMPRESSED:
                    off = e & coff_mask
                    end = off + (((e >> csize_shift) & csize_mask) + 1) * 512 - (off & 511)
                    # (data starting at or past EOF: check -r all makes it zero)
                    if (e & QCOW_OFLAG_COPIED) or end >= file_size + cs or off >= file_size or bm \
                            or <int64_t>((end - 1) >> cluster_bits) >= limit:
                        bad = True
                        break
                elif e & L2E_STD_RESERVED_MASK:
                    bad = True
                    break
                else:
                    off = e & L2E_OFFSET_MASK
                    if off and ((off & (cs - 1)) or off >= file_size
                                or <int64_t>(off >> cluster_bits) >= limit):
                        bad = True
                        break
                    if ((bm >> SC_ZERO_SHIFT) & bm & SC_ALLOC_MASK) or (not off and (bm & SC_ALLOC_MASK)):
                        bad = True
                        break
            odd[r] = bad
            if bad:
                continue
            nxt = 0
            for j in range(n // step):
                i = j * step
                e = QF_BSWAP64(tables[r, i])
                if e & QCOW_OFLAG_COMPRESSED:
                    off = e & coff_mask
                    end = off + (((e >> csize_shift) & csize_mask) + 1) * 512 - (off & 511)
                    last = <int64_t>((end - 1) >> cluster_bits)
                    for c in range(<int64_t>(off >> cluster_bits), last + 1):
                        tally_one(&counts[0], c)
                    allocated += 1
                    compressed += 1
                    fragmented += 1       # "fragmented by nature", as qemu says
                else:
                    off = e & L2E_OFFSET_MASK
                    if off:
                        tally_one(&counts[0], off >> cluster_bits)
                        allocated += 1
                        if nxt and off != nxt:
                            fragmented += 1
                        nxt = off + cs
    return allocated, compressed, fragmented


def l2_copied_rows(uint64_t[:, ::1] tables, const uint8_t[::1] state, int cluster_bits,
                   uint8_t[::1] wrong, bint extended=False, bint fix=False):
    """``wrong[row] = 1`` for each table (rows of on-disk, big-endian words)
    holding a standard allocated entry whose COPIED flag disagrees with its
    cluster's refcount.  ``state[c]``:
    0 refcount != 1, 1 refcount == 1, 2 unreadable or not to be judged;
    clusters past ``state`` have refcount 0.  With ``fix`` every such flag
    is corrected in place (qemu's addend-0 pass of
    qcow2_update_snapshot_refcount)."""
    cdef Py_ssize_t r, i, j, rows = tables.shape[0], n = tables.shape[1]
    cdef Py_ssize_t limit = state.shape[0], step = 2 if extended else 1
    cdef uint64_t e, off
    cdef int64_t c
    cdef uint8_t st
    if wrong.shape[0] < rows:
        raise ValueError("l2_copied_rows: wrong[] shorter than the table count")
    with nogil:
        for r in range(rows):
            wrong[r] = 0
            for j in range(n // step):
                i = j * step
                e = QF_BSWAP64(tables[r, i])
                if e & QCOW_OFLAG_COMPRESSED:
                    continue
                off = e & L2E_OFFSET_MASK
                if not off:
                    continue
                c = <int64_t>(off >> cluster_bits)
                st = state[c] if c < limit else 0
                if st != 2 and (st == 1) != ((e & QCOW_OFLAG_COPIED) != 0):
                    wrong[r] = 1
                    if not fix:
                        break
                    tables[r, i] = QF_BSWAP64(e ^ QCOW_OFLAG_COPIED)


# -- snapshots: the refcounts of whole trees (engine/snapshot_refcount.py) -------------


def l2_clear_copied(uint64_t[:, ::1] tables, uint8_t[::1] changed, bint extended=False):
    """Clear COPIED in every descriptor of the tables (rows of on-disk,
    big-endian words); ``changed[row] = 1`` for each table that had one,
    0 for the others."""
    cdef Py_ssize_t r, i, j, rows = tables.shape[0], n = tables.shape[1]
    cdef Py_ssize_t step = 2 if extended else 1
    cdef uint64_t raw_copied = QF_BSWAP64(QCOW_OFLAG_COPIED)
    cdef uint8_t any_set
    if changed.shape[0] < rows:
        raise ValueError("l2_clear_copied: changed[] shorter than the table count")
    with nogil:
        for r in range(rows):
            any_set = 0
            for j in range(n // step):
                i = j * step
                if tables[r, i] & raw_copied:
                    tables[r, i] &= ~raw_copied
                    any_set = 1
            changed[r] = any_set


ctypedef fused count_t:
    uint32_t
    uint64_t


cdef list _nonzero_blocks(const count_t[::1] counts, int rb_bits):
    cdef Py_ssize_t i = 0, n = counts.shape[0]
    out = []
    while i < n:
        if counts[i]:
            out.append(i >> rb_bits)
            i = ((i >> rb_bits) + 1) << rb_bits       # on to the next block
        else:
            i += 1
    return out


# (Two def functions, not one fused def: a fused def's type dispatch imports numpy.)
def nonzero_blocks(const uint32_t[::1] counts, int rb_bits):
    """The indexes, in order, of the refcount blocks (runs of 2**rb_bits
    counts of a tally; the last may be short) holding a nonzero count."""
    return _nonzero_blocks(counts, rb_bits)


def nonzero_blocks_u64(const uint64_t[::1] values, int rb_bits):
    """nonzero_blocks over refcount values."""
    return _nonzero_blocks(values, rb_bits)


def refcount_change_check(const uint32_t[::1] counts, const uint64_t[::1] values, int addend,
                          uint64_t maxval):
    """The first k where ``values[k]`` (a refcount block's) plus ``counts[k]``
    would pass ``maxval`` (``addend`` > 0), or minus it would go below 0
    (``addend`` < 0); -1 if none."""
    cdef Py_ssize_t k, n = counts.shape[0], found = -1
    if values.shape[0] < n:
        raise ValueError("refcount_change_check: fewer values than counts")
    with nogil:
        for k in range(n):
            if (counts[k] > maxval - values[k]) if addend > 0 else (counts[k] > values[k]):
                found = k
                break
    return found


def refcount_change_apply(uint64_t[::1] values, const uint32_t[::1] counts, int addend,
                          uint8_t[::1] state, int64_t base):
    """``values[k]`` += (``addend`` > 0) or -= ``counts[k]`` in place (checked
    by refcount_change_check first), and ``state[k]`` = 1 if the refcount
    is now 1, 0 if not, for each k the change touches (the others keep
    theirs).  Returns the runs ``[(base + first, n), ...]`` of touched
    clusters whose refcount is now 0."""
    cdef Py_ssize_t k, n = counts.shape[0], start = -1
    if values.shape[0] < n or state.shape[0] < n:
        raise ValueError("refcount_change_apply: values[] or state[] shorter than counts[]")
    freed = []
    for k in range(n):
        if not counts[k]:
            if start >= 0:
                freed.append((base + start, k - start))
                start = -1
            continue
        if addend > 0:
            values[k] += counts[k]
        else:
            values[k] -= counts[k]
        state[k] = values[k] == 1
        if values[k] == 0:
            if start < 0:
                start = k
        elif start >= 0:
            freed.append((base + start, k - start))
            start = -1
    if start >= 0:
        freed.append((base + start, n - start))
    return freed


def count_runs(const uint32_t[::1] counts):
    """``[(first, n, k), ...]``: the runs of n consecutive indexes whose
    count is the same k > 0, in order (one refcount update per run)."""
    cdef Py_ssize_t i = 0, j, n = counts.shape[0]
    out = []
    while i < n:
        if not counts[i]:
            i += 1
            continue
        j = i + 1
        while j < n and counts[j] == counts[i]:
            j += 1
        out.append((i, j - i, counts[i]))
        i = j
    return out


def zero_runs(const uint64_t[::1] words, Py_ssize_t first, Py_ssize_t count,
              Py_ssize_t step=1, uint64_t mask=0xFFFFFFFFFFFFFFFFULL):
    """``[(j, n), ...]``: the runs, in order, of the entries j in [0, count)
    with ``words[first + j * step] & mask == 0`` (refcount values: every
    bit; L2 descriptors of extended entries: step 2, the offset bits)."""
    cdef Py_ssize_t j, start = -1
    if first < 0 or count < 0 or step < 1 or (count and first + (count - 1) * step >= words.shape[0]):
        raise IndexError(f"zero_runs: {count} entries from {first} (step {step}) outside "
                         f"[0, {words.shape[0]})")
    out = []
    for j in range(count):
        if not (words[first + j * step] & mask):
            if start < 0:
                start = j
        elif start >= 0:
            out.append((start, j - start))
            start = -1
    if start >= 0:
        out.append((start, count - start))
    return out


def table_and(uint64_t[::1] table, uint64_t mask):
    """``table[i] &= mask`` for every entry, in place."""
    cdef Py_ssize_t i, n = table.shape[0]
    with nogil:
        for i in range(n):
            table[i] &= mask


# -- extended L2 entries: ranges of subclusters ----------------------------------------


def ext_set_range(uint64_t[::1] words, int64_t u0, int64_t u1, bint reads_zero, bint unmap,
                  int cluster_bits, uint64_t[::1] released):
    """Make subclusters [u0, u1) of a slice of extended entries (native
    words) read as zeros (``reads_zero``) or unallocated: their allocation
    bits are cleared and their zero bits set or cleared, whole clusters at
    a time where the range covers them.  A cluster left with no allocated
    subcluster lets its host cluster go if ``unmap``; so does a compressed
    or shared (not COPIED) cluster the range covers whole.

    Returns (changed, n, stop): ``released[:n]`` are the descriptors whose
    host clusters the caller must release; ``stop`` is -1, or the first
    unit of a compressed or shared cluster covered only in part, where the
    kernel stopped for the caller to copy it first."""
    cdef int64_t u = u0, w, end, stop = -1
    cdef int s0, s1
    cdef uint64_t desc, bm, mask, alloc, zero, host, new_desc, new_bm
    cdef bint foreign, changed = False
    cdef Py_ssize_t n = 0
    if u0 < 0 or u1 > (words.shape[0] // 2) * SUBCLUSTERS or u0 > u1:
        raise IndexError("ext_set_range: range outside the slice")
    with nogil:
        while u < u1:
            end = ((u >> SC_BITS) + 1) << SC_BITS
            if end > u1:
                end = u1
            w = 2 * (u >> SC_BITS)
            s0 = <int>(u & (SUBCLUSTERS - 1))
            s1 = <int>((end - 1) & (SUBCLUSTERS - 1))
            mask = ((((<uint64_t>1) << (s1 - s0)) << 1) - 1) << s0
            desc = words[w]
            bm = words[w + 1]
            host = 0 if desc & QCOW_OFLAG_COMPRESSED else desc & L2E_OFFSET_MASK
            foreign = (desc & QCOW_OFLAG_COMPRESSED) != 0 or \
                (host != 0 and not (desc & QCOW_OFLAG_COPIED))
            if foreign and not (s0 == 0 and s1 == SUBCLUSTERS - 1):
                stop = u
                break
            if foreign:
                new_desc, alloc, zero = 0, 0, 0
            else:
                new_desc = desc
                alloc = bm & SC_ALLOC_MASK & ~mask
                zero = bm >> SC_ZERO_SHIFT
            zero = (zero | mask) if reads_zero else (zero & ~mask)
            if host and not alloc and unmap:
                new_desc = 0
            new_bm = (zero << SC_ZERO_SHIFT) | alloc
            if new_desc != desc or new_bm != bm:
                words[w] = new_desc
                words[w + 1] = new_bm
                changed = True
                if (desc & QCOW_OFLAG_COMPRESSED) or (host and (new_desc & L2E_OFFSET_MASK) != host):
                    released[n] = desc
                    n += 1
            u = end
    return changed, n, stop


def nonzero_units(const uint8_t[::1] buf, int64_t unit, uint8_t[::1] out):
    """out[i] = 1 where unit i of ``buf`` (``len(out)`` units of ``unit``
    bytes, a multiple of 8) holds a nonzero byte, else 0: qemu-img's
    zero detection (-S).  A unit holding data usually ends at its first
    word; only all-zero units are read whole."""
    cdef int64_t i, j, n = out.shape[0], words = unit // 8
    cdef const uint64_t *w
    if unit <= 0 or unit % 8 or n * unit > buf.shape[0]:
        raise ValueError("nonzero_units: units of a multiple of 8 bytes inside the buffer")
    if n == 0:
        return
    with nogil:
        for i in range(n):
            w = <const uint64_t *>&buf[i * unit]
            out[i] = 0
            for j in range(words):
                if w[j]:
                    out[i] = 1
                    break


def differing_units(const uint8_t[::1] a, const uint8_t[::1] b, int64_t unit,
                    uint8_t[::1] out):
    """out[i] = 1 where unit i of ``a`` and of ``b`` (``len(out)`` units of
    ``unit`` bytes) differ, else 0: qemu-img rebase's comparison of the
    old and the new backing chain.  Units that differ usually do so in
    their first bytes; only equal units are read whole."""
    cdef int64_t i, n = out.shape[0]
    if unit <= 0 or n * unit > a.shape[0] or n * unit > b.shape[0]:
        raise ValueError("differing_units: units inside both buffers")
    if n == 0:
        return
    with nogil:
        for i in range(n):
            out[i] = memcmp(&a[i * unit], &b[i * unit], unit) != 0


# -- tables and packed bitmaps (what opening an image validates and marks) -----

def table_first_with(const uint64_t[::1] table, uint64_t mask):
    """Index of the first entry with any bit of ``mask`` set, or -1."""
    cdef Py_ssize_t i, n = table.shape[0], found = -1
    with nogil:
        for i in range(n):
            if table[i] & mask:
                found = i
                break
    return found


def table_first_past(const uint64_t[::1] table, uint64_t offset_mask, uint64_t size,
                     uint64_t limit):
    """Index of the first entry whose offset (``entry & offset_mask``) is
    set and whose ``size`` bytes end past ``limit``, or -1.  (No wrap: an
    offset within ``size`` of 2^64 ends past any limit.)"""
    cdef Py_ssize_t i, n = table.shape[0], found = -1
    cdef uint64_t off
    with nogil:
        for i in range(n):
            off = table[i] & offset_mask
            if off and (off > limit or size > limit - off):
                found = i
                break
    return found


def bits_set(uint8_t[::1] bits, int64_t first, int64_t n, bint value=True):
    """Set (or clear) bits [first, first+n) of packed ``bits`` (bit ``i & 7``
    of byte ``i >> 3``); bits past its end are left out."""
    cdef int64_t i, end = min(first + n, <int64_t>bits.shape[0] * 8)
    if first < 0:
        raise IndexError(f"bit {first} is negative")
    with nogil:
        i = first
        while i < end:
            if (i & 7) == 0 and i + 8 <= end:
                bits[i >> 3] = 0xFF if value else 0
                i += 8
                continue
            if value:
                bits[i >> 3] |= <uint8_t>(1 << (i & 7))
            else:
                bits[i >> 3] &= <uint8_t>~(1 << (i & 7))
            i += 1


def bits_set_each(uint8_t[::1] bits, const int64_t[::1] items):
    """Set bit ``c`` of packed ``bits`` for each ``c`` of ``items`` (each
    inside: 0 <= c < 8 * len(bits))."""
    cdef Py_ssize_t i, n = items.shape[0]
    cdef int64_t c, nbits = <int64_t>bits.shape[0] * 8
    for i in range(n):
        if not 0 <= items[i] < nbits:
            raise IndexError(f"bit {items[i]} outside [0, {nbits})")
    with nogil:
        for i in range(n):
            c = items[i]
            bits[c >> 3] |= <uint8_t>(1 << (c & 7))


def bits_set_table(uint8_t[::1] bits, const uint64_t[::1] table, uint64_t offset_mask,
                   int shift):
    """For each entry whose offset (``entry & offset_mask``) is set, set bit
    ``offset >> shift`` of packed ``bits`` if it lies inside.  Returns one
    past the largest such bit (0 if none): a caller whose ``bits`` were too
    short grows them and calls again."""
    cdef Py_ssize_t i, n = table.shape[0]
    cdef uint64_t off, c, nbits = <uint64_t>bits.shape[0] * 8, top = 0
    with nogil:
        for i in range(n):
            off = table[i] & offset_mask
            if off:
                c = off >> shift
                if c >= top:
                    top = c + 1
                if c < nbits:
                    bits[c >> 3] |= <uint8_t>(1 << (c & 7))
    return top
