/* Stress test of csrc/qf_rwlock.h (tests/unit/test_rwlock.py builds and
 * runs it): readers (waiting and trying) check that a writer's two
 * counters are never seen apart; writers (waiting and trying) change them
 * inside the lock.  Exits 1 on a torn read, 2 if a kind of holder starved. */
#include "qf_rwlock.h"
#include <stdio.h>

static qf_rwlock_t *L;
static volatile long a, b;
static atomic_long torn, reads, writes, tried_reads, tried_writes;
static atomic_int stop;

static void *reader(void *arg)
{
    int trying = (int)(long)arg;
    while (!atomic_load(&stop)) {
        if (trying ? qf_rw_tryrdlock(L) : qf_rw_rdlock(L))
            continue;
        long seen = a;
        for (int i = 0; i < 50; i++)
            __asm__ volatile("");
        if (seen != b)
            atomic_fetch_add(&torn, 1);
        atomic_fetch_add(trying ? &tried_reads : &reads, 1);
        qf_rw_unlock(L);
    }
    return NULL;
}

static void *writer(void *arg)
{
    int trying = (int)(long)arg;
    while (!atomic_load(&stop)) {
        if (trying ? qf_rw_trywrlock(L) : qf_rw_wrlock(L))
            continue;
        a++;
        for (int i = 0; i < 20; i++)
            __asm__ volatile("");
        b++;
        atomic_fetch_add(trying ? &tried_writes : &writes, 1);
        qf_rw_unlock(L);
        usleep(10);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int ms = argc > 1 ? atoi(argv[1]) : 1000;
    pthread_t t[7];
    L = qf_rw_new();
    for (long i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, reader, (void *)(i & 1));
    for (long i = 0; i < 3; i++)
        pthread_create(&t[4 + i], NULL, writer, (void *)(i & 1));
    usleep(ms * 1000);
    atomic_store(&stop, 1);
    for (int i = 0; i < 7; i++)
        pthread_join(t[i], NULL);
    qf_rw_free(L);
    printf("torn %ld reads %ld tried_reads %ld writes %ld tried_writes %ld a %ld b %ld\n",
           (long)torn, (long)reads, (long)tried_reads, (long)writes, (long)tried_writes, a, b);
    if (torn || a != b || a != writes + tried_writes)
        return 1;
    return (reads && tried_reads && writes && tried_writes) ? 0 : 2;
}
