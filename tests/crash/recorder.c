/* Crash-state testing: an LD_PRELOAD library recording every write-like
 * call a process makes on a set of files (tests/crash/harness.py builds it
 * with gcc and reads the log).
 *
 * CRASHREC_FILES  colon-separated absolute paths to watch (as readlink of
 *                 /proc/self/fd/N gives them)
 * CRASHREC_LOG    the log file (appended, binary records below)
 *
 * Recorded on a watched file, whatever calls them (Python's os module, the
 * C loops of the Cython kernels, numpy): pwrite, pwritev(2), write and
 * writev (at the file position), ftruncate, fallocate, posix_fallocate,
 * and fdatasync/fsync as barriers (sync_file_range is not one, and mmap
 * writes are not seen: the engine uses neither).  A write on a descriptor
 * opened O_SYNC or O_DSYNC, or a pwritev2 with RWF_(D)SYNC, is followed by a
 * barrier record.  The process may add marks
 * (crashrec_mark) that land in the same sequence.
 *
 * A record: struct rec, then `len` data bytes for a write.  The real call
 * is made first and recorded only if it succeeded, under one lock, so the
 * log order is an order the calls could have happened in.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum { OP_PATH = 'P', OP_WRITE = 'W', OP_TRUNC = 'T', OP_FALLOC = 'F', OP_SYNC = 'S',
       OP_MARK = 'M' };

struct rec {
    uint8_t op;
    uint8_t pad[3];
    int32_t fid;        /* index in CRASHREC_FILES; the mark's kind for OP_MARK */
    int64_t mode;       /* fallocate mode; -1 for posix_fallocate */
    int64_t off;
    int64_t len;
};

#define MAX_FILES 16
static char *files[MAX_FILES];
static int nfiles = -1;
static int log_fd = -1;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void raw_write_all(const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        long k = syscall(SYS_write, log_fd, p, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            abort();        /* a lost record would make every state wrong */
        p += k;
        n -= (size_t)k;
    }
}

static void setup(void)
{
    if (nfiles >= 0)
        return;
    nfiles = 0;
    const char *lp = getenv("CRASHREC_LOG"), *fl = getenv("CRASHREC_FILES");
    if (!lp || !fl)
        return;
    log_fd = (int)syscall(SYS_openat, AT_FDCWD, lp, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC,
                          0644);
    if (log_fd < 0)
        abort();
    char *copy = strdup(fl), *save = NULL;
    for (char *t = strtok_r(copy, ":", &save); t && nfiles < MAX_FILES;
         t = strtok_r(NULL, ":", &save)) {
        struct rec r = {.op = OP_PATH, .fid = nfiles, .len = (int64_t)strlen(t)};
        files[nfiles++] = t;
        raw_write_all(&r, sizeof r);
        raw_write_all(t, strlen(t));
    }
}

/* The watched file `fd` is, or -1.  Looked up on every call (no cache to
 * go stale when a descriptor is closed and its number reused). */
static int fid_of(int fd)
{
    char link[64], path[4096];
    setup();
    if (nfiles <= 0 || fd < 0)
        return -1;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0)
        return -1;
    path[n] = 0;
    for (int i = 0; i < nfiles; i++)
        if (strcmp(path, files[i]) == 0)
            return i;
    return -1;
}

static int is_sync_fd(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl >= 0 && (fl & (O_SYNC | O_DSYNC));
}

static void record(uint8_t op, int fid, int64_t mode, int64_t off, int64_t len,
                   const struct iovec *iov, int iovcnt)
{
    struct rec r = {.op = op, .fid = fid, .mode = mode, .off = off, .len = len};
    raw_write_all(&r, sizeof r);
    int64_t left = len;
    for (int i = 0; i < iovcnt && left > 0; i++) {
        size_t k = iov[i].iov_len < (size_t)left ? iov[i].iov_len : (size_t)left;
        raw_write_all(iov[i].iov_base, k);
        left -= (int64_t)k;
    }
}

#define REAL(name, ret, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name)

/* One write of `n` bytes from `iov` at `off` that the real call made. */
static void after_write(int fd, int fid, int64_t off, ssize_t n, const struct iovec *iov,
                        int iovcnt)
{
    if (fid < 0 || n <= 0)
        return;
    record(OP_WRITE, fid, 0, off, n, iov, iovcnt);
    if (is_sync_fd(fd))
        record(OP_SYNC, fid, 0, 0, 0, NULL, 0);
}

#define WRITE_AT(name, offtype)                                                        \
    ssize_t name(int fd, const void *buf, size_t count, offtype off)                  \
    {                                                                                  \
        REAL(name, ssize_t, int, const void *, size_t, offtype);                       \
        int fid = fid_of(fd);                                                          \
        if (fid < 0)                                                                   \
            return real_##name(fd, buf, count, off);                                   \
        pthread_mutex_lock(&lock);                                                     \
        ssize_t n = real_##name(fd, buf, count, off);                                  \
        int e = errno;                                                                 \
        struct iovec v = {(void *)buf, count};                                         \
        after_write(fd, fid, (int64_t)off, n, &v, 1);                                  \
        pthread_mutex_unlock(&lock);                                                   \
        errno = e;                                                                     \
        return n;                                                                      \
    }
WRITE_AT(pwrite, off_t)
WRITE_AT(pwrite64, off64_t)

#define WRITEV_AT(name, offtype)                                                       \
    ssize_t name(int fd, const struct iovec *iov, int iovcnt, offtype off)            \
    {                                                                                  \
        REAL(name, ssize_t, int, const struct iovec *, int, offtype);                  \
        int fid = fid_of(fd);                                                          \
        if (fid < 0)                                                                   \
            return real_##name(fd, iov, iovcnt, off);                                  \
        pthread_mutex_lock(&lock);                                                     \
        ssize_t n = real_##name(fd, iov, iovcnt, off);                                 \
        int e = errno;                                                                 \
        after_write(fd, fid, (int64_t)off, n, iov, iovcnt);                            \
        pthread_mutex_unlock(&lock);                                                   \
        errno = e;                                                                     \
        return n;                                                                      \
    }
WRITEV_AT(pwritev, off_t)
WRITEV_AT(pwritev64, off64_t)

#define WRITEV2_AT(name, offtype)                                                      \
    ssize_t name(int fd, const struct iovec *iov, int iovcnt, offtype off, int flags) \
    {                                                                                  \
        REAL(name, ssize_t, int, const struct iovec *, int, offtype, int);             \
        int fid = fid_of(fd);                                                          \
        if (fid < 0)                                                                   \
            return real_##name(fd, iov, iovcnt, off, flags);                           \
        pthread_mutex_lock(&lock);                                                     \
        off_t at = off == -1 ? lseek(fd, 0, SEEK_CUR) : (off_t)off;                    \
        ssize_t n = real_##name(fd, iov, iovcnt, off, flags);                          \
        int e = errno;                                                                 \
        after_write(fd, fid, (int64_t)at, n, iov, iovcnt);                             \
        if (n > 0 && (flags & (RWF_DSYNC | RWF_SYNC)))                                 \
            record(OP_SYNC, fid, 0, 0, 0, NULL, 0);                                    \
        pthread_mutex_unlock(&lock);                                                   \
        errno = e;                                                                     \
        return n;                                                                      \
    }
WRITEV2_AT(pwritev2, off_t)
WRITEV2_AT(pwritev64v2, off64_t)

ssize_t write(int fd, const void *buf, size_t count)
{
    REAL(write, ssize_t, int, const void *, size_t);
    int fid = fid_of(fd);
    if (fid < 0)
        return real_write(fd, buf, count);
    pthread_mutex_lock(&lock);
    off_t at = (fcntl(fd, F_GETFL) & O_APPEND) ? lseek(fd, 0, SEEK_END) : lseek(fd, 0, SEEK_CUR);
    ssize_t n = real_write(fd, buf, count);
    int e = errno;
    struct iovec v = {(void *)buf, count};
    after_write(fd, fid, (int64_t)at, n, &v, 1);
    pthread_mutex_unlock(&lock);
    errno = e;
    return n;
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    REAL(writev, ssize_t, int, const struct iovec *, int);
    int fid = fid_of(fd);
    if (fid < 0)
        return real_writev(fd, iov, iovcnt);
    pthread_mutex_lock(&lock);
    off_t at = (fcntl(fd, F_GETFL) & O_APPEND) ? lseek(fd, 0, SEEK_END) : lseek(fd, 0, SEEK_CUR);
    ssize_t n = real_writev(fd, iov, iovcnt);
    int e = errno;
    after_write(fd, fid, (int64_t)at, n, iov, iovcnt);
    pthread_mutex_unlock(&lock);
    errno = e;
    return n;
}

#define TRUNC(name, offtype)                                                           \
    int name(int fd, offtype len)                                                      \
    {                                                                                  \
        REAL(name, int, int, offtype);                                                 \
        int fid = fid_of(fd);                                                          \
        if (fid < 0)                                                                   \
            return real_##name(fd, len);                                               \
        pthread_mutex_lock(&lock);                                                     \
        int rc = real_##name(fd, len);                                                 \
        int e = errno;                                                                 \
        if (rc == 0)                                                                   \
            record(OP_TRUNC, fid, 0, 0, (int64_t)len, NULL, 0);                        \
        pthread_mutex_unlock(&lock);                                                   \
        errno = e;                                                                     \
        return rc;                                                                     \
    }
TRUNC(ftruncate, off_t)
TRUNC(ftruncate64, off64_t)

#define FALLOC(name, offtype)                                                          \
    int name(int fd, int mode, offtype off, offtype len)                               \
    {                                                                                  \
        REAL(name, int, int, int, offtype, offtype);                                   \
        int fid = fid_of(fd);                                                          \
        if (fid < 0)                                                                   \
            return real_##name(fd, mode, off, len);                                    \
        pthread_mutex_lock(&lock);                                                     \
        int rc = real_##name(fd, mode, off, len);                                      \
        int e = errno;                                                                 \
        if (rc == 0)                                                                   \
            record(OP_FALLOC, fid, mode, (int64_t)off, (int64_t)len, NULL, 0);         \
        pthread_mutex_unlock(&lock);                                                   \
        errno = e;                                                                     \
        return rc;                                                                     \
    }
FALLOC(fallocate, off_t)
FALLOC(fallocate64, off64_t)

#define POSIX_FALLOC(name, offtype)                                                    \
    int name(int fd, offtype off, offtype len)                                         \
    {                                                                                  \
        REAL(name, int, int, offtype, offtype);                                        \
        int fid = fid_of(fd);                                                          \
        if (fid < 0)                                                                   \
            return real_##name(fd, off, len);                                          \
        pthread_mutex_lock(&lock);                                                     \
        int rc = real_##name(fd, off, len);                                            \
        if (rc == 0)                                                                   \
            record(OP_FALLOC, fid, -1, (int64_t)off, (int64_t)len, NULL, 0);           \
        pthread_mutex_unlock(&lock);                                                   \
        return rc;                                                                     \
    }
POSIX_FALLOC(posix_fallocate, off_t)
POSIX_FALLOC(posix_fallocate64, off64_t)

#define SYNC(name)                                                                     \
    int name(int fd)                                                                   \
    {                                                                                  \
        REAL(name, int, int);                                                          \
        int fid = fid_of(fd);                                                          \
        if (fid < 0)                                                                   \
            return real_##name(fd);                                                    \
        pthread_mutex_lock(&lock);                                                     \
        int rc = real_##name(fd);                                                      \
        int e = errno;                                                                 \
        if (rc == 0)                                                                   \
            record(OP_SYNC, fid, 0, 0, 0, NULL, 0);                                    \
        pthread_mutex_unlock(&lock);                                                   \
        errno = e;                                                                     \
        return rc;                                                                     \
    }
SYNC(fdatasync)
SYNC(fsync)

/* A mark in the sequence (kind, a, b): the workload's guest operations. */
void crashrec_mark(int kind, int64_t a, int64_t b)
{
    setup();
    if (log_fd < 0)
        return;
    pthread_mutex_lock(&lock);
    record(OP_MARK, kind, 0, a, b, NULL, 0);
    pthread_mutex_unlock(&lock);
}
