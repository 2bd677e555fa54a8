#!/usr/bin/env bash
# The README's test command: run from the repository root on a fresh machine.
#
#   scripts/test.sh [extra pytest args...]
#
# 1. Installs the qemu oracle (Debian qemu-utils) when qemu-img/qemu-io are
#    missing, qemu-system-x86 (savevm/loadvm) when qemu-system-x86_64 is,
#    the NBD clients (libnbd-bin) when nbdinfo/nbdcopy are, an SSH server
#    (openssh-server: the ssh:// tests) when sshd is, strace
#    (the jitter benchmark counts syncs with it) -- and,
#    only if they are missing too, a C compiler and the Python
#    headers needed to build the Cython extensions (apt-get; sudo if not root).
# 2. pip install -e '.[test,dask,remote]' (pytest, hypothesis, pytest-benchmark, mypy,
#    moto; Dask for the fleet tests; fsspec, aiohttp, s3fs and paramiko for the
#    remote-image tests).  A
#    Debian system Python is "externally managed" (PEP 668): then a .venv is
#    created in the repository and used instead.
# 3. python -m pytest -q tests "$@"
#
# Exits non-zero on any failure.  CI=true (see .ci/run) turns a missing
# qemu-img into a test-session failure instead of skipped interop tests.
set -euo pipefail

cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python

py_check() { "$PYTHON" -c "$1" >/dev/null 2>&1; }

# A system interpreter that pip must not install into (Debian's PEP 668 marker).
externally_managed=0
if py_check 'import os, sys, sysconfig
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(
    os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
    externally_managed=1
fi

packages=()
if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; then
    packages+=(qemu-utils)
fi
if ! compgen -G "/usr/lib/*/qemu/block-curl.so" >/dev/null; then
    packages+=(qemu-block-extra)   # qemu's curl driver: the remote-image tests' oracle
fi
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    packages+=(qemu-system-x86)    # savevm/loadvm: the VM-state tests' oracle
fi
if ! command -v nbdinfo >/dev/null 2>&1 || ! command -v nbdcopy >/dev/null 2>&1; then
    packages+=(libnbd-bin)      # the NBD server tests' clients
fi
if ! command -v strace >/dev/null 2>&1; then
    packages+=(strace)          # the jitter benchmark counts syncs with it
fi
if ! command -v fio >/dev/null 2>&1; then
    packages+=(fio)             # the threads benchmark's C-level limit (fio io_uring)
fi
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh-agent >/dev/null 2>&1; then
    packages+=(openssh-server openssh-client)   # the ssh:// tests' server (tests/remote)
fi
if [ ! -x /usr/bin/time ]; then
    packages+=(time)            # the chain benchmark's peak RSS (GNU time)
fi
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
    packages+=(gcc)
fi
if ! py_check 'import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)'; then
    packages+=(python3-dev)
fi
if [ "$externally_managed" = 1 ] && [ ! -x .venv/bin/python ] && ! py_check 'import ensurepip, venv'; then
    packages+=(python3-venv)
fi

if [ "${#packages[@]}" -gt 0 ]; then
    echo "== installing Debian packages: ${packages[*]}" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo"
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
fi

if [ "$externally_managed" = 1 ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "== $PYTHON is externally managed: creating .venv" >&2
        "$PYTHON" -m venv .venv
    fi
    PYTHON=.venv/bin/python
fi

echo "== $PYTHON -m pip install -e '.[test,dask,remote]'" >&2
"$PYTHON" -m pip install -q -e '.[test,dask,remote]'

echo "== $PYTHON -m pytest -q tests $*" >&2
exec "$PYTHON" -m pytest -q tests "$@"
