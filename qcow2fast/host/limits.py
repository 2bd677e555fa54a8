"""Living inside an address-space limit (RLIMIT_AS).

OpenStack and KubeVirt run qemu-img under ``prlimit --as=1G --cpu=30`` for
images users upload; qcow2fast's command line must work there too.  What
takes address space is mostly not data: each thread reserves its stack
(RLIMIT_STACK, 8 MiB) and, once it allocates, a glibc malloc arena
(64 MiB reserved), and numpy's OpenBLAS starts one thread per CPU at import
(the package asks it for one: qcow2fast/__init__.py).  Measured here: a
conversion's VmPeak grows by about 87 MiB per worker thread.
"""

import resource

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


def fit_threads(threads):
    """``threads``, or fewer (at least one) if that many would not fit."""
    left = address_space_left()
    if left is None:
        return threads
    return max(1, min(threads, (left - RESERVE) // THREAD_ADDRESS_SPACE))
