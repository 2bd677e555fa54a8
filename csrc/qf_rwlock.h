/* qcow2fast: the image's reader-writer lock, with readers that share no
 * cache line.
 *
 * glibc's pthread_rwlock keeps one reader count: every reader's lock and
 * unlock is an atomic operation on that one line, which then moves between
 * the CPUs of threads reading the same image (about a tenth of the time of
 * a cached 4 KiB read at two threads).  Here a reader counts itself in one
 * of QF_RW_SHARDS counters, each on its own cache line, chosen by its
 * thread; a writer sets ``writer`` and waits until every counter is zero.
 *
 * Same contract as a writer-preferring, non-recursive pthread_rwlock
 * (PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP), which it replaces:
 * - a waiting writer holds new readers back (they wait on ``wmutex``);
 * - a thread must not take it again while holding it (a reader that did
 *   would wait for a writer that waits for it);
 * - qf_rw_unlock releases either kind: the writer is known by ``owner``;
 * - the calls that wait (qf_rw_rdlock, qf_rw_wrlock) are made without the
 *   GIL; the try calls never wait.
 *
 * Mutual exclusion (Dekker's): a reader increments its counter, then reads
 * ``writer``; a writer sets ``writer``, then reads the counters, all
 * sequentially consistent.  So either the reader sees the writer and backs
 * off, or the writer sees the reader and waits for it.  A reader leaving
 * while ``writer`` is set bumps ``drained`` and wakes the writer (a futex),
 * which re-reads the counters after reading ``drained``: no wake-up is lost.
 *
 * The shard of a thread is a hash of pthread_self(), so every extension
 * module finds the same one (a lock taken in one module may be released in
 * another); two threads on one shard are correct, only slower.
 */
#ifndef QF_RWLOCK_H
#define QF_RWLOCK_H

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>

#define QF_RW_SHARDS 16
#define QF_CACHE_LINE 64

typedef struct {
    atomic_long n;                       /* readers of this shard holding the lock */
    char pad[QF_CACHE_LINE - sizeof(atomic_long)];
} qf_rw_shard;

typedef struct {
    qf_rw_shard shard[QF_RW_SHARDS];     /* first: the allocation is line-aligned */
    atomic_int writer;                   /* a writer holds the lock or waits for readers */
    atomic_uint drained;                 /* futex word: a reader left while ``writer`` */
    atomic_uintptr_t owner;              /* pthread_self() of the writer holding it, or 0 */
    pthread_mutex_t wmutex;              /* held by the writer; waiting readers queue on it */
} qf_rwlock_t;

static inline qf_rw_shard *qf_rw_my_shard(qf_rwlock_t *l)
{
    uint64_t h = (uint64_t)(uintptr_t)pthread_self() * 0x9E3779B97F4A7C15ULL;
    return &l->shard[h >> 60];           /* top 4 bits: QF_RW_SHARDS == 16 */
}

/* A new lock, or NULL (out of memory). */
static inline qf_rwlock_t *qf_rw_new(void)
{
    void *p = NULL;
    qf_rwlock_t *l;
    int i;
    if (posix_memalign(&p, QF_CACHE_LINE, sizeof(qf_rwlock_t)) != 0)
        return NULL;
    l = (qf_rwlock_t *)p;
    for (i = 0; i < QF_RW_SHARDS; i++)
        atomic_init(&l->shard[i].n, 0);
    atomic_init(&l->writer, 0);
    atomic_init(&l->drained, 0);
    atomic_init(&l->owner, 0);
    pthread_mutex_init(&l->wmutex, NULL);
    return l;
}

static inline void qf_rw_free(qf_rwlock_t *l)
{
    if (l != NULL) {
        pthread_mutex_destroy(&l->wmutex);
        free(l);
    }
}

/* A reader's counter down; wakes a writer waiting for it. */
static inline void qf_rw_leave(qf_rwlock_t *l, qf_rw_shard *s)
{
    atomic_fetch_sub(&s->n, 1);
    if (atomic_load(&l->writer)) {
        atomic_fetch_add(&l->drained, 1);
        syscall(SYS_futex, &l->drained, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    }
}

static inline int qf_rw_tryrdlock(qf_rwlock_t *l)
{
    qf_rw_shard *s = qf_rw_my_shard(l);
    atomic_fetch_add(&s->n, 1);
    if (!atomic_load(&l->writer))
        return 0;
    qf_rw_leave(l, s);
    return EBUSY;
}

static inline int qf_rw_rdlock(qf_rwlock_t *l)
{
    while (qf_rw_tryrdlock(l) != 0) {
        /* Wait for the writer: it holds wmutex until it is done. */
        pthread_mutex_lock(&l->wmutex);
        pthread_mutex_unlock(&l->wmutex);
    }
    return 0;
}

static inline int qf_rw_readers(qf_rwlock_t *l)
{
    int i;
    for (i = 0; i < QF_RW_SHARDS; i++)
        if (atomic_load(&l->shard[i].n) != 0)
            return 1;
    return 0;
}

static inline int qf_rw_wrlock(qf_rwlock_t *l)
{
    unsigned seen;
    struct timespec wait = {0, 10 * 1000 * 1000};    /* a re-check, should a wake go astray */
    pthread_mutex_lock(&l->wmutex);
    atomic_store(&l->writer, 1);
    for (;;) {
        seen = atomic_load(&l->drained);
        if (!qf_rw_readers(l))
            break;
        syscall(SYS_futex, &l->drained, FUTEX_WAIT_PRIVATE, seen, &wait, NULL, 0);
    }
    atomic_store(&l->owner, (uintptr_t)pthread_self());
    return 0;
}

static inline int qf_rw_trywrlock(qf_rwlock_t *l)
{
    if (pthread_mutex_trylock(&l->wmutex) != 0)
        return EBUSY;
    atomic_store(&l->writer, 1);
    if (qf_rw_readers(l)) {
        atomic_store(&l->writer, 0);
        pthread_mutex_unlock(&l->wmutex);
        return EBUSY;
    }
    atomic_store(&l->owner, (uintptr_t)pthread_self());
    return 0;
}

static inline int qf_rw_unlock(qf_rwlock_t *l)
{
    if (atomic_load(&l->owner) == (uintptr_t)pthread_self()) {
        atomic_store(&l->owner, 0);
        atomic_store(&l->writer, 0);
        pthread_mutex_unlock(&l->wmutex);
    } else {
        qf_rw_leave(l, qf_rw_my_shard(l));
    }
    return 0;
}

#endif
