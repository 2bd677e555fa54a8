"""Living inside an address-space limit (RLIMIT_AS).

OpenStack and KubeVirt run qemu-img under ``prlimit --as=1G --cpu=30`` for
images users upload; qcow2fast's command line must work there too.  What
takes address space is mostly not data: each thread reserves its stack
(RLIMIT_STACK, 8 MiB) and, once it allocates, a glibc malloc arena
(64 MiB reserved), and numpy's OpenBLAS starts one thread per CPU at import
(the package asks it for one: qcow2fast/__init__.py).  Measured here: a
conversion's VmPeak grows by about 87 MiB per worker thread.
"""

import _thread
import resource
import signal
import sys
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
    """Stops the command with a clear error before RLIMIT_CPU ends it.

    With ``prlimit --cpu=30`` (soft = hard) the kernel sends SIGKILL, not
    SIGXCPU, at the limit: nothing would be said.  Two stages:

    - a daemon thread watches the process's CPU time and at ``limit -
      MARGIN`` raises LimitExceededError in the main thread (through the
      Python SIGXCPU handler), so the command stops as from any error;
    - the soft limit is lowered one second below the hard one, and the
      kernel's SIGXCPU there runs a C handler (_ext/fileio) that writes the
      message and exits with status 1.  That holds even while the main
      thread is inside one long C call holding the GIL, where neither the
      thread nor a Python handler can run."""

    MARGIN, POLL = 3.0, 0.05

    def __init__(self, limit, prog):
        from .._ext.fileio import install_cpu_limit_handler
        self.limit = limit
        signal.signal(signal.SIGXCPU, self._raise)      # what interrupt_main trips
        if limit >= 2:
            resource.setrlimit(resource.RLIMIT_CPU,
                               (limit - 1, resource.getrlimit(resource.RLIMIT_CPU)[1]))
        # (over the Python handler at the OS level: the kernel's SIGXCPU is final)
        install_cpu_limit_handler(f"{prog}: {self.message()}\n".encode())
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
        if sys.version_info >= (3, 10):
            _thread.interrupt_main(signal.SIGXCPU)
        else:                   # (no signal number there: the C handler's message and exit)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGXCPU)
