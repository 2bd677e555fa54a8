/* qcow2fast: I/O loops shared by the Cython kernels.
 *
 * All functions are safe to call without the GIL.  They return the number of
 * bytes transferred or -errno.  Reads past the end of the file are filled
 * with zeros (a qcow2 cluster may be allocated past EOF until written).
 */
#ifndef QF_IO_H
#define QF_IO_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/falloc.h>
#endif

static inline int64_t qf_pread_full(int fd, char *buf, size_t len, int64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0) {               /* EOF: the rest reads as zeros */
            memset(buf + done, 0, len - done);
            break;
        }
        done += (size_t)n;
    }
    return (int64_t)len;
}

/* Buffered write calls cover at most QF_WRITE_MAX bytes
 * (qcow2fast/host/file.py says why: larger buffered writes take
 * 2 MiB page-cache folios, which cost host faults in VMs with free page
 * reporting).  O_DIRECT writes (``max`` 0) go whole: no page cache, and
 * each call is a device round trip.
 *
 * Invariant: a write is cut only at QF_WRITE_ALIGN (sector) boundaries of
 * the file, so no 512-byte sector is written by two calls (a power loss
 * between them would leave a sector holding neither the old bytes nor the
 * new).  A sector-aligned write is cut exactly as before, every QF_WRITE_MAX
 * from its start (a cut at 4 KiB boundaries instead cost the unaligned
 * 320 KiB writes of `bench -o 512` a third call and 27%). */
#define QF_WRITE_MAX ((size_t)256 << 10)
#define QF_WRITE_ALIGN ((size_t)512)

/* The length of the next piece of a buffered write at ``off``: at most
 * ``max``, ending on a QF_WRITE_ALIGN boundary unless it is the last. */
static inline size_t qf_write_piece(int64_t off, size_t left, size_t max)
{
    size_t room = max - (size_t)((uint64_t)off % QF_WRITE_ALIGN);
    return left < room ? left : room;
}

static inline int64_t qf_pwrite_full(int fd, const char *buf, size_t len, int64_t off,
                                     size_t max)
{
    size_t done = 0;
    while (done < len) {
        size_t want = max ? qf_write_piece(off + (int64_t)done, len - done, max)
                          : len - done;
        ssize_t n = pwrite(fd, buf + done, want, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        done += (size_t)n;
    }
    return (int64_t)len;
}

static inline int qf_punch_hole(int fd, int64_t off, int64_t len)
{
#ifdef FALLOC_FL_PUNCH_HOLE
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 0;
    return -errno;
#else
    return -EOPNOTSUPP;
#endif
}

static inline int qf_zero_range(int fd, int64_t off, int64_t len)
{
#ifdef FALLOC_FL_ZERO_RANGE
    if (fallocate(fd, FALLOC_FL_ZERO_RANGE, (off_t)off, (off_t)len) == 0)
        return 0;
    return -errno;
#else
    return -EOPNOTSUPP;
#endif
}

#endif
