/* qcow2fast: batches of reads and writes, through io_uring where the kernel
 * has it, else one pread/pwrite after the other.
 *
 * A minimal io_uring (the raw system calls and the shared rings of
 * <linux/io_uring.h>; liburing does the same with more options): one ring
 * per thread, made on the thread's first batch and freed when the thread
 * ends, so no ring is ever shared and SINGLE_ISSUER holds.  A batch is
 * submitted and waited for with one io_uring_enter.  Where io_uring_setup
 * fails (old kernel, seccomp, io_uring_disabled) or the ring breaks, the
 * same batch runs as a plain loop of pread/pwrite (qf_io.h).
 *
 * All functions are safe to call without the GIL.
 */
#ifndef QF_URING_H
#define QF_URING_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/io_uring.h>

#include "qf_io.h"

#define QF_RING_ENTRIES 64          /* requests one io_uring_enter carries at most */

enum { QF_OP_READ = 0, QF_OP_WRITE = 1 };
#define QF_XFER_PENDING INT64_MIN     /* ``res`` of a transfer not done yet */

/* One host transfer of a batch; ``res`` is set to the bytes moved or -errno. */
typedef struct {
    int fd;
    int op;                         /* QF_OP_READ or QF_OP_WRITE */
    char *buf;
    int64_t len;
    int64_t off;
    int64_t res;
    size_t write_max;               /* qf_pwrite_full's ``max`` for this file */
} qf_xfer;

typedef struct {
    int fd;
    unsigned entries;
    unsigned *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    struct io_uring_sqe *sqes;
    void *sq_map, *cq_map;
    size_t sq_len, cq_len, sqes_len;
} qf_ring;

/* Which engine batches use: QF_ENGINE_URING io_uring (when it can be set
 * up), QF_ENGINE_PREAD the pread/pwrite loop, QF_ENGINE_AUTO io_uring for
 * batches of O_DIRECT transfers only.  Process-wide; tests and benchmarks
 * switch it.  Measured on a 2-CPU VM (kernel 6.18), page-cached 4 KiB
 * reads cost less CPU as a pread loop than through io_uring at every batch
 * size up to 32 (1.03-0.91M against 0.64-0.94M requests per CPU-second):
 * a cached read is a copy done by the calling thread either way, and the
 * ring adds its own work per request.  O_DIRECT transfers are device round
 * trips, which io_uring keeps in flight together. */
enum { QF_ENGINE_PREAD = 0, QF_ENGINE_URING = 1, QF_ENGINE_AUTO = 2 };
static int qf_uring_wanted = QF_ENGINE_AUTO;

/* Of a batch of n transfers, those from n / qf_uring_split on are flagged
 * IOSQE_ASYNC: the kernel's io-wq workers carry them out on another CPU
 * while this thread does the first ones itself (a page-cached transfer is
 * otherwise done inline, one after the other, by the submitting thread).
 * 0 (the default: on a loaded 2-CPU VM the hand-off cost more than it
 * gave, see the issue note): none, everything inline. */
static int qf_uring_split = 0;

static void qf_ring_free(qf_ring *r)
{
    if (r == NULL)
        return;
    if (r->sqes != NULL && r->sqes != MAP_FAILED)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_map != NULL && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_len);
    if (r->sq_map != NULL && r->sq_map != MAP_FAILED)
        munmap(r->sq_map, r->sq_len);
    if (r->fd >= 0)
        close(r->fd);
    free(r);
}

static qf_ring *qf_ring_new(unsigned entries)
{
    /* Flags tried in turn: newest first (fewest task-work interruptions). */
    static const unsigned tries[] = {
#if defined(IORING_SETUP_DEFER_TASKRUN) && defined(IORING_SETUP_SINGLE_ISSUER)
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
#endif
#ifdef IORING_SETUP_COOP_TASKRUN
        IORING_SETUP_COOP_TASKRUN,
#endif
        0};
    struct io_uring_params p;
    qf_ring *r = calloc(1, sizeof(*r));
    size_t i;
    if (r == NULL)
        return NULL;
    r->fd = -1;
    for (i = 0; i < sizeof(tries) / sizeof(tries[0]); i++) {
        memset(&p, 0, sizeof(p));
        p.flags = tries[i];
        r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
        if (r->fd >= 0)
            break;
        if (errno != EINVAL)
            break;                  /* ENOSYS, EPERM...: no io_uring here */
    }
    if (r->fd < 0)
        goto fail;
    r->entries = p.sq_entries;
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_len > r->sq_len)
            r->sq_len = r->cq_len;
        r->cq_len = r->sq_len;
    }
    r->sq_map = mmap(NULL, r->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     r->fd, IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED)
        goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP)
        r->cq_map = r->sq_map;
    else {
        r->cq_map = mmap(NULL, r->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                         r->fd, IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED)
            goto fail;
    }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   r->fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED)
        goto fail;
    r->sq_tail = (unsigned *)((char *)r->sq_map + p.sq_off.tail);
    r->sq_mask = (unsigned *)((char *)r->sq_map + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)((char *)r->sq_map + p.sq_off.array);
    r->cq_head = (unsigned *)((char *)r->cq_map + p.cq_off.head);
    r->cq_tail = (unsigned *)((char *)r->cq_map + p.cq_off.tail);
    r->cq_mask = (unsigned *)((char *)r->cq_map + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)((char *)r->cq_map + p.cq_off.cqes);
    return r;
fail:
    qf_ring_free(r);
    return NULL;
}

static pthread_key_t qf_ring_key;
static pthread_once_t qf_ring_once = PTHREAD_ONCE_INIT;
static int qf_ring_key_ok;
static __thread int qf_ring_failed;        /* setup failed on this thread: don't retry */

static void qf_ring_destroy(void *r) { qf_ring_free((qf_ring *)r); }
static void qf_ring_key_init(void) { qf_ring_key_ok = pthread_key_create(&qf_ring_key, qf_ring_destroy) == 0; }

/* This thread's ring, made on first use; NULL when io_uring is off or
 * cannot be had. */
static qf_ring *qf_thread_ring(void)
{
    qf_ring *r;
    if (qf_uring_wanted == QF_ENGINE_PREAD || qf_ring_failed)
        return NULL;
    pthread_once(&qf_ring_once, qf_ring_key_init);
    if (!qf_ring_key_ok)
        return NULL;
    r = (qf_ring *)pthread_getspecific(qf_ring_key);
    if (r == NULL) {
        r = qf_ring_new(QF_RING_ENTRIES);
        if (r == NULL || pthread_setspecific(qf_ring_key, r) != 0) {
            qf_ring_free(r);
            qf_ring_failed = 1;
            return NULL;
        }
    }
    return r;
}

/* Drop this thread's ring (after an error that leaves it unusable: any
 * request still queued in it dies with it). */
static void qf_thread_ring_drop(void)
{
    qf_ring *r = (qf_ring *)pthread_getspecific(qf_ring_key);
    if (r != NULL) {
        pthread_setspecific(qf_ring_key, NULL);
        qf_ring_free(r);
    }
}

/* One transfer done synchronously (also the end of a short one). */
static void qf_xfer_sync(qf_xfer *x, int64_t done)
{
    int64_t rc;
    if (x->op == QF_OP_READ)
        rc = qf_pread_full(x->fd, x->buf + done, (size_t)(x->len - done), x->off + done);
    else
        rc = qf_pwrite_full(x->fd, x->buf + done, (size_t)(x->len - done), x->off + done,
                            x->write_max);
    x->res = rc < 0 ? rc : x->len;
}

/* The ring's part: submit ``n`` (<= its entries) transfers and reap their
 * completions.  Returns 0, or -1 when the ring failed (the caller drops it;
 * transfers still QF_XFER_PENDING were not done). */
static int qf_ring_run(qf_ring *r, qf_xfer *x, int n)
{
    unsigned tail = *r->sq_tail, mask = *r->sq_mask, head;
    int i, submitted = 0, reaped = 0;
    long ret;
    for (i = 0; i < n; i++) {
        unsigned idx = (tail + (unsigned)i) & mask;
        struct io_uring_sqe *sqe = &r->sqes[idx];
        memset(sqe, 0, sizeof(*sqe));
        sqe->opcode = x[i].op == QF_OP_READ ? IORING_OP_READ : IORING_OP_WRITE;
        sqe->fd = x[i].fd;
        sqe->addr = (uint64_t)(uintptr_t)x[i].buf;
        sqe->len = (uint32_t)x[i].len;
        sqe->off = (uint64_t)x[i].off;
        sqe->user_data = (uint64_t)i;
        if (qf_uring_split > 0 && n >= 4 && i >= n / qf_uring_split)
            sqe->flags |= IOSQE_ASYNC;
        r->sq_array[idx] = idx;
        x[i].res = QF_XFER_PENDING;
    }
    __atomic_store_n(r->sq_tail, tail + (unsigned)n, __ATOMIC_RELEASE);
    while (reaped < n) {
        ret = syscall(__NR_io_uring_enter, r->fd, (unsigned)(n - submitted),
                      (unsigned)(n - reaped), IORING_ENTER_GETEVENTS, NULL, 0);
        if (ret < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        submitted += (int)ret;
        head = *r->cq_head;
        while (head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
            struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            x[cqe->user_data].res = cqe->res;
            head++;
            reaped++;
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
        if (submitted < n && ret == 0 && reaped >= submitted)
            return -1;              /* the kernel takes no more: give up the ring */
    }
    return 0;
}

/* Run ``n`` transfers, each to completion: short transfers finished and
 * EAGAIN/EINTR redone synchronously, ``res`` = len or -errno.  ``direct``:
 * the file is open with O_DIRECT.  Returns whether io_uring carried them
 * (1) or the pread/pwrite loop did (0). */
static int qf_xfer_batch(qf_xfer *x, int n, int direct)
{
    int want = qf_uring_wanted == QF_ENGINE_URING || (qf_uring_wanted == QF_ENGINE_AUTO && direct);
    qf_ring *r = n > 1 && want ? qf_thread_ring() : NULL;
    int i, start, k, ring = r != NULL;
    if (r != NULL) {
        for (start = 0; start < n; start += k) {
            k = n - start < (int)r->entries ? n - start : (int)r->entries;
            if (qf_ring_run(r, x + start, k) < 0) {
                qf_thread_ring_drop();
                for (i = start; i < n; i++)
                    x[i].res = QF_XFER_PENDING;
                ring = 0;
                break;
            }
        }
    } else {
        for (i = 0; i < n; i++)
            x[i].res = QF_XFER_PENDING;
    }
    for (i = 0; i < n; i++) {
        if (x[i].res == QF_XFER_PENDING || x[i].res == -EAGAIN || x[i].res == -EINTR)
            qf_xfer_sync(&x[i], 0);
        else if (x[i].res >= 0 && x[i].res < x[i].len)
            qf_xfer_sync(&x[i], x[i].res);      /* short: the rest (zeros past EOF) */
    }
    return ring;
}

#endif
