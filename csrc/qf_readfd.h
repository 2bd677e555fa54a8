/* qcow2fast: a descriptor of its own for each thread reading a file.
 *
 * Every read system call on a descriptor that several threads share takes
 * and drops a reference on its struct file (fdget/fput): an atomic
 * operation on one cache line, which then moves between the CPUs of the
 * reading threads -- in a C program of two threads reading the page cache
 * through one descriptor, a sixth of the time; each thread reading through
 * its own (a second open of the same file) reads 12-16% more.  So the
 * batch engine's reads (batch.pyx) go through a descriptor chosen by the
 * thread: slot 0 is the file's own descriptor; the others are opened on
 * first use through /proc/self/fd (the same inode, whatever became of the
 * path) with the file's flags, read-only.  A thread's slot is a hash of
 * pthread_self(); two threads may share one (correct, only slower).  If
 * the reopen fails (no /proc, out of descriptors) the slot stays on the
 * file's own descriptor.  Writes and syncs always use the file's own
 * descriptor: the page cache is one per inode, so reads through any
 * descriptor see them.
 *
 * The slots are closed with the file (File.close, suspend), which happens
 * only when no one reads it (the image's exclusive lock).
 */
#ifndef QF_READFD_H
#define QF_READFD_H

#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#define QF_READ_FDS 8                /* slots: the file's descriptor and 7 reopened */
#define QF_READ_FD_NONE (-1)         /* not opened yet */
#define QF_READ_FD_FAILED (-2)       /* the reopen failed: the file's descriptor */

static inline void qf_read_fds_init(int *slots)
{
    int i;
    for (i = 0; i < QF_READ_FDS; i++)
        slots[i] = QF_READ_FD_NONE;
}

/* The descriptor this thread reads the file open as ``fd`` through. */
static inline int qf_read_fd(int *slots, int fd, int oflags)
{
    uint64_t h = (uint64_t)(uintptr_t)pthread_self() * 0x9E3779B97F4A7C15ULL;
    int i = (int)(h >> 61);          /* top 3 bits: QF_READ_FDS == 8 */
    int cur, nfd, expected = QF_READ_FD_NONE;
    char path[48];
    if (i == 0 || fd < 0)
        return fd;
    cur = __atomic_load_n(&slots[i], __ATOMIC_ACQUIRE);
    if (cur >= 0)
        return cur;
    if (cur == QF_READ_FD_FAILED)
        return fd;
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    nfd = open(path, (oflags & ~(O_ACCMODE | O_CREAT | O_TRUNC | O_EXCL)) | O_RDONLY | O_CLOEXEC);
    if (!__atomic_compare_exchange_n(&slots[i], &expected,
                                     nfd >= 0 ? nfd : QF_READ_FD_FAILED, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        if (nfd >= 0)                /* another thread of this slot opened one first */
            close(nfd);
        return expected >= 0 ? expected : fd;
    }
    return nfd >= 0 ? nfd : fd;
}

static inline void qf_read_fds_close(int *slots)
{
    int i;
    for (i = 0; i < QF_READ_FDS; i++) {
        if (slots[i] >= 0)
            close(slots[i]);
        slots[i] = QF_READ_FD_NONE;
    }
}

#endif
