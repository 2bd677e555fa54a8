#!/usr/bin/env bash
# qcow2fast's "main job" on a fresh (Debian) machine:
#   1. install what is missing: qemu-utils (qemu-img, qemu-io) via apt-get, a C
#      compiler and the Python headers if the build needs them, then
#      `pip install -e .` (builds the Cython kernels);
#   2. create an image with qcow2fast, write it, read it back and check it;
#   3. print `qemu-img check` of it, and compare it with qemu-img against the
#      expected contents;
#   4. run the quick side-by-side benchmark: python -m benchmarks.io_bench --quick
#
# Usage: scripts/demo.sh            (from anywhere; works in the repository root)
# Environment: PYTHON   interpreter to use (default: python3, else python)
#              PIP_ARGS extra arguments for `pip install -e .`
#              DEMO_BENCH_ARGS extra arguments for the benchmark (e.g. "--json out.json")
# Exits non-zero as soon as any step fails.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'demo.sh: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install these by hand: $*"
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

# -- 1. prerequisites ----------------------------------------------------------------

say "checking prerequisites"
if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; then
    say "installing qemu-utils (qemu-img, qemu-io)"
    apt_install qemu-utils
fi
qemu-img --version | sed -n 1p

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if command -v python3 >/dev/null 2>&1; then PY=python3
    elif command -v python >/dev/null 2>&1; then PY=python
    else
        apt_install python3 python3-pip python3-venv python3-dev
        PY=python3
    fi
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 9), sys.version' \
    || die "$PY is older than Python 3.9"

# Building the Cython kernels needs a C compiler and Python.h.
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
    apt_install build-essential
fi
if ! "$PY" -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    apt_install python3-dev
fi

# A Debian system Python refuses `pip install` (PEP 668): use a virtualenv in
# .venv then (ignored by git).
IN_VENV=$("$PY" -c 'import sys; print(int(sys.prefix != sys.base_prefix))')
MANAGED=$("$PY" -c 'import os, sysconfig; print(int(os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')
if [ "$IN_VENV" = 0 ] && [ "$MANAGED" = 1 ]; then
    if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
        say "system Python is externally managed: creating .venv"
        "$PY" -m venv --clear .venv 2>/dev/null \
            || { apt_install python3-venv; "$PY" -m venv --clear .venv; }
    fi
    PY=$REPO/.venv/bin/python
fi
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m ensurepip --upgrade 2>/dev/null || apt_install python3-pip
fi

say "pip install -e . (builds the Cython kernels)"
# shellcheck disable=SC2086
"$PY" -m pip install ${PIP_ARGS:-} -e .
"$PY" -c 'import qcow2fast; print("qcow2fast imported from", qcow2fast.__file__)'

# -- 2. create, write and read an image with qcow2fast ---------------------------------

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/qcow2fast-demo.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
IMG=$WORK/demo.qcow2
EXPECTED=$WORK/expected.raw

say "creating, writing and reading $IMG with qcow2fast"
"$PY" - "$IMG" "$EXPECTED" <<'EOF'
import os
import sys

import qcow2fast

img_path, expected_path = sys.argv[1], sys.argv[2]
MiB = 1 << 20
size = 64 * MiB

qcow2fast.create(img_path, size, cluster_size=65536)
expected = bytearray(size)

# A few writes of different shapes: unaligned, spanning clusters, a whole
# cluster, 4 KiB blocks, one near the end.
writes = [
    (0, b"qcow2fast demo\n" * 100),
    (65536 - 1000, bytes(range(256)) * 16),
    (3 * MiB, os.urandom(65536)),
    (10 * MiB + 512, os.urandom(3 * 4096 + 17)),
    (size - 4096, b"\xa5" * 4096),
]
with qcow2fast.open(img_path, "r+", cache_mode="writeback") as img:
    for off, data in writes:
        img.write(off, data)
        expected[off:off + len(data)] = data
    for i in range(256):                       # 256 x 4 KiB, sequential
        off = 20 * MiB + i * 4096
        data = bytes([i]) * 4096
        img.write(off, data)
        expected[off:off + 4096] = data
    img.flush()

with qcow2fast.open(img_path) as img:
    assert img.size == size, img.size
    for off, data in writes:
        got = img.read(off, len(data))
        assert got == data, f"read back mismatch at {off:#x}"
    buf = bytearray(4096)
    for i in range(256):
        img.readinto(20 * MiB + i * 4096, buf)
        assert buf == bytes([i]) * 4096, f"readinto mismatch in block {i}"
    whole = img.read(0, size)
    assert whole == expected, "whole-image read differs from what was written"
    extents = img.block_status()
    n_data = sum(1 for e in extents if e.kind == "data")

with open(expected_path, "wb") as f:
    f.write(expected)
print(f"wrote {len(writes) + 256} requests, read them back: OK "
      f"({n_data} data extents, {len(extents)} extents in all)")
EOF

say "qemu-img info"
qemu-img info "$IMG"

say "qemu-img check (qemu's verdict on the image qcow2fast wrote)"
qemu-img check "$IMG"

say "qemu-img compare against the expected contents"
qemu-img compare -f qcow2 -F raw "$IMG" "$EXPECTED"

# -- 3. the benchmark ------------------------------------------------------------------------

say "python -m benchmarks.io_bench --quick"
# shellcheck disable=SC2086
"$PY" -m benchmarks.io_bench --quick ${DEMO_BENCH_ARGS:-}

say "demo finished OK"
