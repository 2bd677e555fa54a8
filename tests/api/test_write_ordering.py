"""Syncs and write ordering, seen with strace: how many fdatasyncs each
cache mode makes, that a new L2 table's L1 entry reaches the disk only
after the table and its refcounts are stable, and that sync modes write
metadata in 4 KiB blocks.  Every image is then checked by qemu."""

import os
import re
import shutil
import struct
import subprocess
import sys

import pytest

from tests.helpers.qemu_util import MiB, header, qemu_check, qemu_raw
from tests.helpers.write_util import qf_create

pytestmark = pytest.mark.qemu


SYNC_SCRIPT = """
import sys, qcow2fast
with qcow2fast.open(sys.argv[1], "r+", cache_mode=sys.argv[2]) as img:
    for i in range(20):
        img.write(i << 16, b"\\x5a" * 4096)
    img.flush()
"""


@pytest.mark.parametrize("cache_mode,least,most", [
    ("unsafe", 0, 0),               # qemu: flush and close never sync
    ("writeback", 1, 8),            # the flush's barriers, and close's
    ("writethrough", 20, 80)])      # every allocating write
def test_syncs_per_cache_mode(tmp_path, cache_mode, least, most):
    from benchmarks.jitter_bench import count_syncs
    strace = shutil.which("strace")
    assert strace, "strace is needed (scripts/test.sh installs it)"
    path = qf_create(tmp_path / "s.qcow2", 4 * MiB)
    n = count_syncs(strace, [sys.executable, "-c", SYNC_SCRIPT, str(path), cache_mode])
    assert least <= n <= most, f"{n} syncs under cache={cache_mode}"
    qemu_check(path)
    raw = qemu_raw(path)
    assert all(raw[i << 16:(i << 16) + 4096] == b"\x5a" * 4096 for i in range(20))


ORDER_SCRIPT = """
import os, sys, qcow2fast
with qcow2fast.open(sys.argv[1], "r+", cache_mode="writeback") as img:
    for i in range(64):
        img.write(i << 16, b"\\x5a" * 4096)      # allocates both L2 tables
    os.write(2, b"FLUSH\\n")
    img.flush()
    os.write(2, b"FLUSHED\\n")
"""


GROWTH_SCRIPT = """
import os, sys, qcow2fast
img = qcow2fast.open(sys.argv[1], "r+", cache_mode="directsync", lazy_refcounts=True)
for i in range(20):
    img.write((i << 16) + 512, b"\\x5a" * 4096)
print(os.path.getsize(sys.argv[1]))
img.close()
"""


def test_lazy_directsync_grows_ahead_and_trims_at_close(tmp_path):
    """Under lazy refcounts in a sync mode the file grows ahead (one
    barrier per step, not per write: about one sync per allocating write,
    as qemu's 1.03) and close cuts what no cluster uses."""
    from benchmarks.jitter_bench import count_syncs
    path = qf_create(tmp_path / "g.qcow2", 4 * MiB)
    n = count_syncs(shutil.which("strace"), [sys.executable, "-c", GROWTH_SCRIPT, str(path)])
    assert 20 <= n <= 28, f"{n} syncs for 20 allocating writes"     # (+ open, close)
    path2 = qf_create(tmp_path / "g2.qcow2", 4 * MiB)
    grown = int(subprocess.run([sys.executable, "-c", GROWTH_SCRIPT, str(path2)],
                               capture_output=True, text=True, check=True).stdout)
    assert grown >= 32 * MiB                    # GROW_MIN ahead, sparse
    end = os.path.getsize(path2)
    assert end < 2 * MiB                        # trimmed: 20 clusters and the metadata
    qemu_check(path2)
    raw = qemu_raw(path2)
    assert all(raw[(i << 16) + 512:(i << 16) + 4608] == b"\x5a" * 4096 for i in range(20))
    assert raw.count(0) == len(raw) - 20 * 4096


LAZY_WRITEBACK_SCRIPT = """
import os, sys, qcow2fast
with qcow2fast.open(sys.argv[1], "r+", cache_mode="writeback", lazy_refcounts=True) as img:
    img.write(0, b"\\x5a" * 4096)           # the dirty bit is made stable first
    os.write(2, b"MARK\\n")
    for i in range(1, 600):                 # 37.5 MiB of new clusters: past GROW_MIN
        img.write(i << 16, b"\\x5a" * 4096)
    os.write(2, b"MARK\\n")
    img.flush()
    os.write(2, b"MARK\\n")
    for i in range(600, 640):               # into the step the flush made stable
        img.write(i << 16, b"\\x5a" * 4096)
    img.flush()
    os.write(2, b"MARK\\n")
    print(os.path.getsize(sys.argv[1]))
"""


def test_lazy_writeback_grows_ahead_at_the_flush(tmp_path):
    """Under writeback with lazy refcounts no write waits for a barrier (the
    file used to grow, and sync, on the write path: a 3-20 ms stall every
    32 MiB or eighth of the file); the flush's data barrier grows the file a
    step ahead, so the next flush, whose new clusters are all inside that
    step, makes its L2 entries stable with one sync and no data barrier."""
    strace = shutil.which("strace")
    assert strace, "strace is needed (scripts/test.sh installs it)"
    path = qf_create(tmp_path / "l.qcow2", 64 * MiB, lazy_refcounts=True)
    trace = tmp_path / "trace"
    p = subprocess.run([strace, "-f", "-o", str(trace), "-e",
                        "trace=fdatasync,fsync,write,ftruncate", sys.executable, "-c",
                        LAZY_WRITEBACK_SCRIPT, path], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    events = []
    for line in trace.read_text().splitlines():
        if re.search(r"\b(fdatasync|fsync)\(", line):
            events.append("sync")
        elif re.search(r'write\(2, "MARK\\n"', line):
            events.append("mark")
        elif m := re.search(r"ftruncate\(\d+, (\d+)\)", line):
            events.append(int(m[1]))
    marks = [i for i, e in enumerate(events) if e == "mark"]
    assert len(marks) == 4, events
    writes, first_flush, second = (events[marks[0]:marks[1]], events[marks[1]:marks[2]],
                                   events[marks[2]:marks[3]])
    assert "sync" not in writes, "an allocating write synced"
    grown = [e for e in first_flush if isinstance(e, int)]
    assert grown and grown[0] >= 600 * 65536 + 32 * MiB, first_flush    # a step ahead
    # the data barrier (after the growth), the L2 table, its new L1 entry
    assert first_flush.count("sync") == 3 and first_flush.index(grown[0]) < \
        first_flush.index("sync"), first_flush
    assert second.count("sync") == 1, second              # no data barrier
    assert not any(isinstance(e, int) for e in second), second
    qemu_check(path)
    raw = qemu_raw(path)
    assert all(raw[i << 16:(i << 16) + 4096] == b"\x5a" * 4096 for i in range(0, 640, 37))
    assert os.path.getsize(path) < 640 * 65536 + 2 * MiB     # close trimmed the step


def test_l2_allocation_is_ordered_at_flush(tmp_path):
    """Allocating an L2 table under writeback syncs nothing; the flush writes
    refcounts, then (after a sync) the L2 tables, then (after a sync) the L1
    entries that point to them, then syncs again: qemu's order, with qemu's
    per-allocation syncs moved to the flush."""
    strace = shutil.which("strace")
    assert strace, "strace is needed (scripts/test.sh installs it)"
    size = 64 << 16
    path = qf_create(tmp_path / "o.qcow2", size, cluster_size=4096)   # 512 entries per L2
    h = header(path)
    trace = tmp_path / "trace"
    p = subprocess.run([strace, "-f", "-o", str(trace), "-e",
                        "trace=pwrite64,pwritev,fdatasync,fsync,write", sys.executable, "-c",
                        ORDER_SCRIPT, path], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    events = []                 # ("sync",) / ("mark", text) / ("write", offset, length)
    for line in trace.read_text().splitlines():
        if re.search(r"\b(fdatasync|fsync)\(", line):
            events.append(("sync",))
        elif m := re.search(r'write\(2, "(FLUSH|FLUSHED)\\n"', line):
            events.append(("mark", m[1]))
        elif m := re.search(r"pwrite(?:64|v)\(\d+, .*, (\d+), (\d+)\) = \d+$", line):
            events.append(("write", int(m[2]), int(m[1])))
    marks = [i for i, e in enumerate(events) if e[0] == "mark"]
    assert len(marks) == 2, events[-10:]
    flush_start, flush_end = marks
    assert ("sync",) not in events[:flush_start], "an allocating write synced"
    with open(path, "rb") as f:
        f.seek(h["l1_table_offset"])
        l1 = struct.unpack(">2Q", f.read(16))
    l2_tables = [e & 0x00fffffffffffe00 for e in l1]
    assert all(l2_tables), l1
    l1_writes = [i for i, e in enumerate(events) if e[0] == "write" and
                 h["l1_table_offset"] <= e[1] < h["l1_table_offset"] + 16]
    l2_writes = [i for i, e in enumerate(events) if e[0] == "write" and
                 any(t <= e[1] < t + 4096 for t in l2_tables)]
    assert l1_writes and all(flush_start < i < flush_end for i in l1_writes), events
    last_l2 = max(i for i in l2_writes if i > flush_start)     # the flush writes the entries
    assert all(("sync",) in events[last_l2:i] for i in l1_writes), \
        "an L1 entry was written before its L2 table was stable"
    assert ("sync",) in events[max(l1_writes):flush_end], "flush ended before the L1 entries"
    qemu_check(path)
    raw = qemu_raw(path)
    assert all(raw[i << 16:(i << 16) + 4096] == b"\x5a" * 4096 for i in range(64))


WT_SCRIPT = """
import os, sys, qcow2fast
with qcow2fast.open(sys.argv[1], "r+", cache_mode=sys.argv[2]) as img:
    img.write(0, b"\\x5a" * 4096)         # the L2 table and first refcounts, allocated
    os.write(2, b"FLUSH\\n")
    for i in range(1, 40):
        img.write(i << 16, b"\\x5a" * 4096)
    os.write(2, b"FLUSHED\\n")
"""


@pytest.mark.parametrize("cache_mode", ["writethrough", "directsync"])
def test_sync_modes_write_metadata_in_4k_blocks(tmp_path, cache_mode):
    """Under writethrough/directsync each allocating write makes its refcount
    and L2 changes stable: 4 KiB blocks of them, not 64 KiB cache entries."""
    strace = shutil.which("strace")
    assert strace, "strace is needed (scripts/test.sh installs it)"
    path = qf_create(tmp_path / "w.qcow2", 64 * MiB)
    trace = tmp_path / "trace"
    p = subprocess.run([strace, "-f", "-o", str(trace), "-e", "trace=pwrite64,pwritev,write",
                        sys.executable, "-c", WT_SCRIPT, path, cache_mode],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    text = trace.read_text()
    body = text[text.index('"FLUSH\\n"'):text.index('"FLUSHED\\n"')]
    sizes = [int(m[1]) for m in re.finditer(r"pwrite(?:64|v)\(\d+, .*, (\d+), \d+\) = ", body)]
    assert len(sizes) >= 3 * 39, sizes          # data, refcount block, L2 slice per write
    assert set(sizes) == {4096}, sorted(set(sizes))
    qemu_check(path)
    raw = qemu_raw(path)
    assert all(raw[i << 16:(i << 16) + 4096] == b"\x5a" * 4096 for i in range(40))
