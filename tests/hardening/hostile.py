"""Hostile images: well-formed enough to pass the header checks, built to
make a reader allocate or work without bound (a small file that maps
petabytes through one shared L2 table, compressed clusters that inflate
past a cluster, a refcount table and a snapshot table at qemu's limits
whose entries all share one block).  Each starts as a qemu-made image and
is patched in place; tests/hardening/test_untrusted.py runs the command
line on them under ``prlimit --as=1G --cpu=30``."""

import struct
import zlib

import numpy as np

from tests.helpers.qemu_util import (H_L1_SIZE, H_L1_TABLE_OFFSET, H_NB_SNAPSHOTS,
                                     H_REFCOUNT_TABLE_CLUSTERS, H_REFCOUNT_TABLE_OFFSET, H_SIZE,
                                     H_SNAPSHOTS_OFFSET, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
                                     make_compressed_entry, patch, qemu_create, qemu_io)

CS = 65536
L2_ENTRIES = CS // 8
MAX_L1_ENTRIES = (32 << 20) // 8          # qemu's QCOW_MAX_L1_SIZE
MAX_REFTABLE_CLUSTERS = (8 << 20) // CS   # qemu's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536


def _base(path):
    qemu_create(path, 1 << 20, cluster_size=CS)
    qemu_io(path, f"write -q -P 0x11 0 {CS}")
    return path


def _append(f, data):
    """Write ``data`` at the next cluster boundary; return its offset."""
    end = f.seek(0, 2)
    at = -(-end // CS) * CS
    f.seek(at)
    f.write(data)
    return at


def _shared_l1(f, l2_entry, entries=MAX_L1_ENTRIES):
    """One L2 table whose entries are all ``l2_entry``, and an L1 table of
    ``entries`` entries all pointing to it; returns the L1 offset."""
    l2 = np.full(L2_ENTRIES, l2_entry, dtype=">u8")
    l2_at = _append(f, l2.tobytes())
    return _append(f, np.full(entries, l2_at | QCOW_OFLAG_COPIED, dtype=">u8").tobytes())


def l1_bomb(path):
    """2 PiB of virtual disk, all data, mapped by one L2 table shared by
    every L1 entry (a 32 MiB L1 table, the format's largest)."""
    _base(path)
    with open(path, "r+b") as f:
        data_at = _append(f, b"\x42" * CS)
        l1_at = _shared_l1(f, data_at | QCOW_OFLAG_COPIED)
    patch(path, H_SIZE, ">Q", MAX_L1_ENTRIES * L2_ENTRIES * CS)
    patch(path, H_L1_SIZE, ">I", MAX_L1_ENTRIES)
    patch(path, H_L1_TABLE_OFFSET, ">Q", l1_at)
    return path


def compressed_bomb(path):
    """Every cluster compressed, each descriptor naming the largest span
    of a deflate stream that inflates to 64 MiB (a cluster is 64 KiB)."""
    _base(path)
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    stream = c.compress(bytes(64 << 20)) + c.flush()
    with open(path, "r+b") as f:
        at = _append(f, stream)
        entry = make_compressed_entry(at, 255, 16)     # the widest span: 128 KiB
        assert entry & QCOW_OFLAG_COMPRESSED
        l1_at = _shared_l1(f, entry, 64)
    patch(path, H_SIZE, ">Q", 64 * L2_ENTRIES * CS)
    patch(path, H_L1_SIZE, ">I", 64)
    patch(path, H_L1_TABLE_OFFSET, ">Q", l1_at)
    return path


def reftable_bomb(path):
    """A refcount table of qemu's largest size whose entries all point to
    the image's one refcount block."""
    _base(path)
    with open(path, "r+b") as f:
        f.seek(struct.unpack(">Q", _read(f, H_REFCOUNT_TABLE_OFFSET, 8))[0])
        block = struct.unpack(">Q", f.read(8))[0]
        n = MAX_REFTABLE_CLUSTERS * CS // 8
        at = _append(f, np.full(n, block, dtype=">u8").tobytes())
    patch(path, H_REFCOUNT_TABLE_OFFSET, ">Q", at)
    patch(path, H_REFCOUNT_TABLE_CLUSTERS, ">I", MAX_REFTABLE_CLUSTERS)
    return path


def snapshot_bomb(path):
    """qemu's largest snapshot count, every snapshot viewing the same
    largest L1 table (all of it pointing to one shared L2 table)."""
    _base(path)
    with open(path, "r+b") as f:
        data_at = _append(f, b"\x42" * CS)
        l1_at = _shared_l1(f, data_at | QCOW_OFLAG_COPIED)
        # Snapshot entry: l1 offset, l1 size, id len, name len, date s/ns,
        # vm clock, vm state size, extra size; then id, padded to 8.
        entry = struct.pack(">QIHHIIQII", l1_at, MAX_L1_ENTRIES, 1, 0, 0, 0, 0, 0, 0) + b"1"
        entry += bytes(-len(entry) % 8)
        table_at = _append(f, entry * MAX_SNAPSHOTS)
    patch(path, H_NB_SNAPSHOTS, ">I", MAX_SNAPSHOTS)
    patch(path, H_SNAPSHOTS_OFFSET, ">Q", table_at)
    return path


def _read(f, off, n):
    f.seek(off)
    return f.read(n)


HOSTILE = {"l1_bomb": l1_bomb, "compressed_bomb": compressed_bomb,
           "reftable_bomb": reftable_bomb, "snapshot_bomb": snapshot_bomb}
