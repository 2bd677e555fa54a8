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
#include <sys/uio.h>
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

/* A read served from the page cache without blocking: 1 when the whole
 * range was read (the caller may hold the GIL: nothing waited for a disk),
 * 0 when it would block, came up short or failed -- then the caller does
 * the blocking qf_pread_full without the GIL -- and -1 when the file does
 * not support RWF_NOWAIT (not worth trying again).  Buffered files only:
 * with O_DIRECT, RWF_NOWAIT still waits for the device. */
static inline int qf_pread_cached(int fd, char *buf, size_t len, int64_t off)
{
#ifdef RWF_NOWAIT
    struct iovec iov = { buf, len };
    ssize_t n = preadv2(fd, &iov, 1, (off_t)off, RWF_NOWAIT);
    if (n == (ssize_t)len)
        return 1;
    return n < 0 && (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) ? -1 : 0;
#else
    (void)fd; (void)buf; (void)len; (void)off;
    return -1;
#endif
}

static inline int64_t qf_pwrite_full(int fd, const char *buf, size_t len, int64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, buf + done, len - done, (off_t)(off + done));
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
