"""Set-up and checks of the I/O benchmarks: images made by qemu-img, the
page cache brought to one state, qemu's AIO mode, and the verification of
what each engine read and wrote (qemu-img check and compare)."""

import os

from .common import MiB, BenchError, run
from .io_config import CHECK_PATTERN, CLUSTER, REQ, RUN_RE
from .io_engines import Qemu


def qemu_img_create(qemu_img, path, size):
    if os.path.exists(path):
        os.unlink(path)
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", path,
         str(size)])


def raw_create(path, size):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def warm_page_cache(*paths):
    buf = bytearray(4 * MiB)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def settle_page_cache(*paths):
    """The same page-cache history for every file: written back (blocks
    allocated), dropped, then read once the same way."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    warm_page_cache(*paths)


def probe_aio(qemu_img, tmpdir):
    """qemu's fastest AIO mode here: io_uring, else threads."""
    path = os.path.join(tmpdir, "probe.qcow2")
    qemu_img_create(qemu_img, path, 16 * MiB)
    notes = []
    try:
        for aio in ("io_uring", "threads"):
            p = run(Qemu(qemu_img, aio).command(path, 16, REQ, True), check=False)
            if p.returncode == 0 and RUN_RE.search(p.stdout):
                return aio, notes
            notes.append(f"qemu-img bench -i {aio} failed (exit {p.returncode}): "
                         f"{(p.stderr or p.stdout).strip()}")
    finally:
        os.unlink(path)
    raise BenchError("qemu-img bench works neither with -i io_uring nor -i threads:\n"
                     + "\n".join(notes))


def qemu_fixed_cost(qemu, tmpdir, size, samples=5):
    """Wall time of a qemu-img bench process doing one 4 KiB write on a fresh
    image: exec, start-up, open, one request, flush and close.  Reported next
    to the e2e figures; never subtracted."""
    path = os.path.join(tmpdir, "fixed.qcow2")
    walls = []
    for _ in range(samples):
        qemu_img_create(qemu.qemu_img, path, size)
        walls.append(qemu.bench(path, 1, REQ, True)["e2e"])
    os.unlink(path)
    return walls


def verify_reads(qcow2fast, qcow2_path, raw_path, offsets):
    """qcow2fast's readinto/read against the raw copy at a sample of offsets."""
    sample = sorted(set(offsets[:64] + offsets[-64:] + offsets[::max(1, len(offsets) // 256)]))
    buf = bytearray(REQ)
    bad = []
    with open(raw_path, "rb", buffering=0) as raw:
        img = qcow2fast.open(qcow2_path, "r", cache_mode="writeback")
        try:
            for off in sample:
                want = os.pread(raw.fileno(), REQ, off)
                img.readinto(off, buf)
                if bytes(buf) != want or img.read(off, REQ) != want:
                    bad.append(off)
        finally:
            img.close()
    if bad:
        raise BenchError(f"qcow2fast read wrong data at {len(bad)} of {len(sample)} sampled "
                         f"offsets, first {bad[0]:#x} ({qcow2_path} vs {raw_path})")
    return f"{len(sample)} sampled reads match the raw file"


def verify_qf_overwrites(qcow2fast, qemu_img, qcow2_path, raw_path, offsets):
    """Every engine overwrote the same offsets with the same data, so the
    image matching the raw copy does not show that qcow2fast's writes
    landed.  Overwrite the scenario's offsets once more (untimed, same
    Image.write calls) with CHECK_PATTERN, do the same to the raw copy, and
    let qemu-img compare the two."""
    data = bytes([CHECK_PATTERN]) * REQ
    img = qcow2fast.open(qcow2_path, "r+", cache_mode="writeback")
    try:
        for off in offsets:
            img.write(off, data)
    finally:
        img.close()
    fd = os.open(raw_path, os.O_RDWR)
    try:
        for off in offsets:
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)
    qemu_compare(qemu_img, qcow2_path, "qcow2", raw_path, "raw")
    return (f"qcow2fast re-overwrote all {len(offsets)} offsets with {CHECK_PATTERN:#x}: "
            "qemu-img compare image = raw copy")


def qemu_check(qemu_img, path):
    p = run([qemu_img, "check", "-f", "qcow2", path], check=False)
    if p.returncode != 0:
        raise BenchError(f"qemu-img check {path} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p.stdout.strip().splitlines()[0] if p.stdout.strip() else "clean"


def qemu_compare(qemu_img, a, a_fmt, b, b_fmt):
    p = run([qemu_img, "compare", "-f", a_fmt, "-F", b_fmt, a, b], check=False)
    if p.returncode != 0:
        raise BenchError(f"qemu-img compare {a} {b} exited {p.returncode}:\n"
                         f"{p.stdout}{p.stderr}")
