"""Living inside an address-space limit (RLIMIT_AS).

OpenStack and KubeVirt run qemu-img under ``prlimit --as=1G --cpu=30`` for
images users upload; qcow2fast's command line must work there too.  What
takes address space is mostly not data: each thread reserves its stack
(RLIMIT_STACK, 8 MiB) and, once it allocates, a glibc malloc arena
(64 MiB reserved), and numpy's OpenBLAS starts one thread per CPU at import
(the package asks it for one: qcow2fast/__init__.py).  Measured here: a
conversion's VmPeak grows by about 87 MiB per worker thread.
"""

import os
import resource
import signal
import threading
import time

from ..errors import LimitExceededError

THREAD_ADDRESS_SPACE = 96 << 20     # per worker thread, with a margin over the measured 87 MiB
RESERVE = 128 << 20                 # for the caches, batch buffers and what the main thread needs


def address_space_left():
    """Bytes of address space this process may still map (None: unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    return soft - used


def memory_limit_note():
    """' (the address-space limit, RLIMIT_AS, is N MiB)' when there is one."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return ""
    return f" (the address-space limit, RLIMIT_AS, is {soft >> 20} MiB)"


def fit_threads(threads):
    """``threads``, or fewer (at least one) if that many would not fit."""
    left = address_space_left()
    if left is None:
        return threads
    return max(1, min(threads, (left - RESERVE) // THREAD_ADDRESS_SPACE))


class CpuGuard:
    """Stops the command with a clear error just before RLIMIT_CPU ends it.

    With ``prlimit --cpu=30`` (soft = hard) the kernel sends SIGKILL, not
    SIGXCPU, at the limit: nothing would be said.  A daemon thread watches
    the process's CPU time; at ``limit - MARGIN`` it raises
    LimitExceededError in the main thread (through a SIGXCPU handler,
    which also catches the kernel's own SIGXCPU when soft < hard); if the
    main thread is still inside one long C call at ``limit - LAST``, the
    message is written and the process exits with status 1."""

    MARGIN, LAST, POLL = 3.0, 0.5, 0.05

    def __init__(self, limit, prog):
        self.limit = limit
        self.prog = prog
        signal.signal(signal.SIGXCPU, self._raise)
        self._main = threading.main_thread().ident
        threading.Thread(target=self._watch, name="qcow2fast-cpu-guard", daemon=True).start()

    @classmethod
    def install(cls, prog):
        """A guard for this process's RLIMIT_CPU, if it has one; its last
        message starts with ``prog``, the program's name."""
        soft, _ = resource.getrlimit(resource.RLIMIT_CPU)
        if soft == resource.RLIM_INFINITY or threading.current_thread() is not \
                threading.main_thread():        # signal handlers: main thread only
            return None
        return cls(soft, prog)

    def message(self):
        return (f"stopped: the CPU time limit of {self.limit} s (RLIMIT_CPU) is nearly "
                "used up")

    def _raise(self, *_):
        raise LimitExceededError(self.message())

    def _watch(self):
        margin = min(self.MARGIN, self.limit / 3)
        while time.process_time() < self.limit - margin:
            time.sleep(self.POLL)
        signal.pthread_kill(self._main, signal.SIGXCPU)
        while time.process_time() < self.limit - min(self.LAST, self.limit / 10):
            time.sleep(self.POLL)
        os.write(2, f"{self.prog}: {self.message()}\n".encode())
        os._exit(1)
