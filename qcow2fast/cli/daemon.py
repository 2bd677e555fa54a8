"""qemu-nbd's ``--fork`` and ``--pid-file`` (qemu-nbd.c, util/oslib-posix.c
qemu_write_pidfile): the parent exits 0 once the server listens (1 if
it failed, its error printed by the child on the shared stderr), and the
pid file names the process that serves."""

import fcntl
import os

from .options import UsageError


def fork():
    """Fork: the parent waits for the child's word and exits with 0 (it
    is listening) or 1 (it failed before, or died); the child returns a
    function to call once it listens.  The child leaves the terminal's
    session and reads and writes nothing on stdin/stdout (qemu_daemon);
    stderr stays, for its errors.  Call before any thread is started."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            ok = pipe.read(1) == b"\0"
        if not ok:
            os.waitpid(pid, 0)          # it exited: reap it
        raise SystemExit(0 if ok else 1)
    os.close(r)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)

    def ready():
        # From here on stderr goes nowhere either, as qemu-nbd's (a caller
        # reading the parent's stderr to its end must not wait for the server).
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 2)
        os.close(null)
        os.write(w, b"\0")
        os.close(w)
    return ready


_pid_files = []         # kept open (and locked) while the process lives


def write_pid_file(path):
    """Write this process's id into ``path``, locked as qemu locks it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise UsageError(f"Could not create '{path}': {e.strerror}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        raise UsageError(f"Cannot lock pid file '{path}': {e.strerror}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _pid_files.append(fd)
