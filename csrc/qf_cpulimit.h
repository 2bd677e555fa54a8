/* The last word at the CPU time limit (RLIMIT_CPU): a SIGXCPU handler that
 * writes a prepared message and ends the process with status 1.  It is a
 * C handler because the process may be inside one long C call that holds
 * the GIL, where no Python code (a signal handler, a watching thread) runs
 * until the kernel's SIGKILL at the hard limit.  Only async-signal-safe
 * calls: write and _exit. */
#ifndef QF_CPULIMIT_H
#define QF_CPULIMIT_H

#include <signal.h>
#include <string.h>
#include <unistd.h>

static char qf_cpu_message[512];
static size_t qf_cpu_message_len;

static void qf_cpu_limit_handler(int sig)
{
    (void)sig;
    if (write(2, qf_cpu_message, qf_cpu_message_len) < 0) {
        /* nothing more to say */
    }
    _exit(1);
}

/* Install the handler for SIGXCPU with ``msg`` (cut to 512 bytes);
 * returns sigaction's result. */
static int qf_install_cpu_limit_handler(const char *msg, size_t n)
{
    struct sigaction sa;
    if (n > sizeof qf_cpu_message)
        n = sizeof qf_cpu_message;
    memcpy(qf_cpu_message, msg, n);
    qf_cpu_message_len = n;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = qf_cpu_limit_handler;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGXCPU, &sa, NULL);
}

#endif
