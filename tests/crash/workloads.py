"""Crash-state configurations: how each image is set up before recording,
and the guest operations recorded on it (see harness.py's doc for adding
one).  The images are made by qemu-img/qemu-io (snapshots with ``qemu-img
snapshot -c`` until qcow2fast makes its own), so the setup does not depend
on the code under test."""

import os
import subprocess

from .guest import MiB, Config, random_guest_op
from .chain_ops import chain_op
from .metadata_ops import amend_ops, bitmap_ops, resize_ops, snapshot_ops

KiB = 1024


def _qemu_img(*args, cwd=None):
    # qemu 7.2 times LUKS's PBKDF2 with the thread CPU clock and sometimes
    # fails ("Unable to get accurate CPU usage"): such a create is repeated.
    for _ in range(50):
        p = subprocess.run(["qemu-img", *args], capture_output=True, text=True, cwd=cwd)
        if p.returncode == 0 or "accurate CPU usage" not in p.stderr:
            break
    if p.returncode:
        raise AssertionError(f"qemu-img {' '.join(args)}: {p.stderr}")


def _qemu_io(path, *cmds, cfg=None):
    # (in the image's directory: qemu 7.2 opens a relative data file name from there)
    args = ["qemu-io", *(cfg.qemu_args(path) if cfg and cfg.secret else ["-f", "qcow2", path])]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args, check=True, capture_output=True, cwd=os.path.dirname(path))


def _create(cfg, path, *extra, opts=()):
    opts = [f"cluster_size={cfg.cluster_size}", f"compat={cfg.compat}",
            f"refcount_bits={cfg.refcount_bits}", *opts]
    if cfg.compat != "0.10":
        opts.append(f"lazy_refcounts={'on' if cfg.lazy else 'off'}")
    if cfg.extended_l2:
        opts.append("extended_l2=on")
    _qemu_img("create", "-q", "-f", "qcow2", "-o", ",".join(opts), *extra, path,
              str(cfg.size), cwd=os.path.dirname(path))
    return path


def _scatter(cfg, rng, n, pattern_base, compressed=False):
    """qemu-io writes of 1-3 whole clusters at random places in the disk's
    first three quarters that do not overlap (qemu writes compressed
    clusters only where none is)."""
    cs = cfg.cluster_size
    cmds = []
    for i, slot in enumerate(rng.choice(cfg.size * 3 // 16 // cs, size=n, replace=False)):
        c = int(slot) * 4
        k = int(rng.integers(1, 4))
        cmds.append(f"write {'-c ' if compressed else ''}-P {pattern_base + i % 64} "
                    f"{c * cs} {k * cs}")
    return cmds


# -- setups: make the image (and what it stands on), return its path -----------------------

def plain(cfg, d, rng):
    return _create(cfg, os.path.join(d, "img.qcow2"))


def with_data(cfg, d, rng):
    """An image with some data written by qemu before the workload."""
    p = plain(cfg, d, rng)
    _qemu_io(p, *_scatter(cfg, rng, 12, 0x40))
    return p


def with_compressed(cfg, d, rng):
    """Compressed clusters (qemu-io write -c) to copy-on-write from."""
    p = plain(cfg, d, rng)
    _qemu_io(p, *_scatter(cfg, rng, 16, 0x20, compressed=True))
    return p


def with_snapshot(cfg, d, rng):
    """Data, then an internal snapshot: the workload writes over clusters
    (and L2 tables) the snapshot shares."""
    p = with_data(cfg, d, rng)
    _qemu_img("snapshot", "-c", "s1", p)
    return p


def with_data_file(raw):
    """An image whose data lives in an external data file (``img.data``,
    named relative to the image; ``data_file_raw`` when ``raw``), with data
    written by qemu; returns [image, data file]: both are recorded."""
    def setup(cfg, d, rng):
        p = _create(cfg, os.path.join(d, "img.qcow2"),
                    opts=["data_file=img.data", f"data_file_raw={'on' if raw else 'off'}"])
        _qemu_io(p, *_scatter(cfg, rng, 12, 0x50))
        return [p, os.path.join(d, "img.data")]
    return setup


def luks(cfg, d, rng, opts=()):
    """A LUKS-encrypted image (the key ``cfg.secret``) with data written by qemu."""
    p = _create(cfg, os.path.join(d, "img.qcow2"), "--object",
                f"secret,id=sec0,data={cfg.secret}",
                opts=["encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=10",
                      *opts])
    _qemu_io(p, *_scatter(cfg, rng, 12, 0x70), cfg=cfg)
    return p


def luks_data_file(raw):
    """LUKS with an external data file (the encrypted guest data in
    ``img.data``); returns [image, data file], both recorded."""
    def setup(cfg, d, rng):
        p = luks(cfg, d, rng, ["data_file=img.data", f"data_file_raw={'on' if raw else 'off'}"])
        return [p, os.path.join(d, "img.data")]
    return setup


def over_backing(cfg, d, rng):
    """An overlay over a qcow2 backing file with data in it: partial writes
    copy from the backing file."""
    base = os.path.join(d, "base.qcow2")
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", base, str(cfg.size))
    _qemu_io(base, *_scatter(cfg, rng, 24, 0x60))
    return _create(cfg, os.path.join(d, "img.qcow2"), "-b", base, "-F", "qcow2")


def over_full_backing(cfg, d, rng):
    """An overlay over a backing file with data everywhere: what the guest
    sees before any write is the backing file's, never zeros."""
    base = os.path.join(d, "base.qcow2")
    _qemu_img("create", "-q", "-f", "qcow2", base, str(cfg.size))
    _qemu_io(base, f"write -P 0x6b 0 {cfg.size}")
    return _create(cfg, os.path.join(d, "img.qcow2"), "-b", base, "-F", "qcow2")


def chain(cfg, d, rng):
    """top.qcow2 -> mid.qcow2 -> base.qcow2 (relative names), each with
    data of its own written by qemu-io; returns the three paths, top first."""
    paths = []
    for name in ("base", "mid", "top"):
        below = ("-b", os.path.basename(paths[-1]), "-F", "qcow2") if paths else ()
        p = _create(cfg, os.path.join(d, f"{name}.qcow2"), *below)
        _qemu_io(p, *_scatter(cfg, rng, 8, 0x10 + 0x20 * len(paths)))
        paths.append(p)
    return paths[::-1]


# -- workloads: the guest operations recorded ---------------------------------------------

def random_ops(cfg, rng, compressed=0.0, flush_every=5):
    """Writes of 512 B to ``max_write`` (sector aligned mostly, some not),
    zeroes (with and without unmap), discards, flushes every few
    operations, and with ``compressed`` that share of compressed writes."""
    ops = []
    cs = cfg.cluster_size
    # Compressed writes go only where nothing is allocated: to clusters of
    # the disk's last quarter, which nothing else touches, each once.
    top = cfg.size - cfg.size // 4 if compressed else cfg.size
    fresh = top // cs
    for i in range(cfg.nops):
        if rng.random() < compressed and (fresh + 3) * cs <= cfg.size:
            k = int(rng.integers(1, 3))
            ops.append(("compressed", fresh * cs, rng.bytes(64) * (k * cs // 64)))
            fresh += k
        else:
            ops.append(random_guest_op(rng, top, cfg.max_write))
        if i % flush_every == flush_every - 1:
            ops.append(("flush",))
    return ops


def cluster_writes(cfg, rng):
    """Writes of one to four whole clusters (nothing of the layer below
    shows through them), a flush every few."""
    cs, ops = cfg.cluster_size, []
    for i in range(cfg.nops):
        k = int(rng.integers(1, 5))
        ops.append(("write", int(rng.integers(0, cfg.size // cs - k)) * cs, rng.bytes(k * cs)))
        if i % 4 == 3:
            ops.append(("flush",))
    return ops


def compressed_ops(cfg, rng):
    return random_ops(cfg, rng, compressed=0.2)


# -- the configurations ------------------------------------------------------------------------

def _c(name, setup=plain, workload=random_ops, **kw):
    return Config(name, setup, workload, **kw)


TINY_CACHE = {"l2_cache_size": 8 * KiB, "l2_cache_entry_size": 4 * KiB,
              "refcount_cache_size": 8 * KiB}

CONFIGS = [
    # The issue's finding: lazy refcounts, writeback, 64 KiB clusters.
    _c("lazy-writeback-64k", lazy=True, size=32 * MiB),
    _c("lazy-writeback-4k-tiny-cache", lazy=True, cluster_size=4096, open_kw=TINY_CACHE),
    _c("writeback-4k-tiny-cache", cluster_size=4096, open_kw=TINY_CACHE),
    _c("writeback-64k", size=32 * MiB),
    _c("writethrough-64k", cache_mode="writethrough", nops=25),
    _c("none-64k", cache_mode="none"),
    _c("directsync-4k", cache_mode="directsync", cluster_size=4096, nops=20),
    _c("lazy-writethrough-4k", cache_mode="writethrough", lazy=True, cluster_size=4096, nops=20),
    _c("lazy-none-64k", cache_mode="none", lazy=True),
    # Lazy refcounts in sync modes: allocating writes into fresh space that
    # was grown stably skip the data barrier (ImageState.grow_durable).
    _c("lazy-directsync-4k", cache_mode="directsync", lazy=True, cluster_size=4096, nops=20),
    _c("lazy-directsync-64k", cache_mode="directsync", lazy=True, nops=20),
    _c("lazy-backing-writethrough-64k", setup=over_backing, cache_mode="writethrough",
       lazy=True, nops=20),
    # Whole clusters over backing data: the data barrier stays (the guest
    # saw the backing file's bytes there, not zeros).
    _c("lazy-full-backing-writeback-4k", setup=over_full_backing, workload=cluster_writes,
       lazy=True, cluster_size=4096, size=4 * MiB, nops=24),
    _c("lazy-full-backing-directsync-4k", setup=over_full_backing, workload=cluster_writes,
       cache_mode="directsync", lazy=True, cluster_size=4096, size=4 * MiB, nops=12),
    # New L2 tables, refcount blocks and refcount-table growth: 512 B
    # clusters (an L2 table maps 32 KiB, a refcount block 128 KiB of host,
    # a one-cluster refcount table 8 MiB).
    _c("structures-512", cluster_size=512, size=24 * MiB, max_write=512 * KiB, nops=30),
    _c("lazy-structures-512", cluster_size=512, size=24 * MiB, max_write=512 * KiB, nops=30,
       lazy=True),
    _c("backing-cow-64k", setup=over_backing),
    _c("lazy-backing-cow-4k", setup=over_backing, cluster_size=4096, lazy=True),
    _c("compressed-64k", setup=with_compressed, workload=compressed_ops),
    _c("lazy-compressed-4k", setup=with_compressed, workload=compressed_ops, cluster_size=4096,
       lazy=True),
    _c("snapshot-shared-64k", setup=with_snapshot),
    _c("lazy-snapshot-shared-4k", setup=with_snapshot, cluster_size=4096, lazy=True),
    _c("extended-l2-backing-64k", setup=over_backing, extended_l2=True),
    _c("lazy-extended-l2-32k", setup=with_data, extended_l2=True, cluster_size=32768, lazy=True),
    _c("v2-4k", compat="0.10", cluster_size=4096),
    # External data files (data written to img.data, metadata to the image:
    # both recorded, each file its own barriers) and LUKS (every sector
    # encrypted; acknowledged writes read back through the key).
    _c("datafile-writeback-64k", setup=with_data_file(False), aux_files=1),
    _c("datafile-raw-lazy-4k-tiny-cache", setup=with_data_file(True), aux_files=1,
       cluster_size=4096, lazy=True, open_kw=TINY_CACHE),
    _c("datafile-writethrough-64k", setup=with_data_file(False), aux_files=1,
       cache_mode="writethrough", nops=20),
    _c("datafile-raw-none-64k", setup=with_data_file(True), aux_files=1, cache_mode="none"),
    _c("luks-writeback-64k", setup=luks, secret="crash-pass"),
    _c("luks-lazy-4k-tiny-cache", setup=luks, secret="crash-pass", cluster_size=4096,
       lazy=True, open_kw=TINY_CACHE),
    _c("luks-writethrough-4k", setup=luks, secret="crash-pass", cluster_size=4096,
       cache_mode="writethrough", nops=20),
    _c("luks-datafile-writeback-64k", setup=luks_data_file(False), aux_files=1,
       secret="crash-pass"),
    # Operations beyond guest I/O (metadata_ops.py says what each acknowledges).
    _c("snapshot-ops-64k", setup=with_data, workload=snapshot_ops, nops=32),
    _c("snapshot-ops-4k-tiny-cache", setup=with_snapshot, workload=snapshot_ops,
       cluster_size=4096, open_kw=TINY_CACHE, nops=24),
    _c("lazy-snapshot-ops-4k", setup=with_data, workload=snapshot_ops, cluster_size=4096,
       lazy=True, nops=24),
    _c("v2-snapshot-ops-4k", setup=with_data, workload=snapshot_ops, cluster_size=4096,
       compat="0.10", nops=20),
    _c("resize-64k", setup=with_data, workload=resize_ops),
    _c("resize-backing-64k", setup=over_backing, workload=resize_ops),
    _c("resize-4k-snapshot", setup=with_snapshot, workload=resize_ops, cluster_size=4096,
       nops=32),
    _c("lazy-resize-writethrough-4k", setup=with_data, workload=resize_ops, cluster_size=4096,
       lazy=True, cache_mode="writethrough", nops=24),
    _c("amend-refcount-bits-4k", setup=with_snapshot, cluster_size=4096, nops=18,
       workload=amend_ops([{"refcount_bits": 64}, {"refcount_bits": 2}])),
    _c("amend-compat-64k", setup=with_data, nops=18,
       workload=amend_ops([{"compat": "0.10"}, {"compat": "1.1"}])),
    _c("amend-compat-refcount-512", setup=with_data, cluster_size=512, size=8 * MiB, nops=18,
       max_write=64 * KiB, workload=amend_ops([{"refcount_bits": 8},
                                                {"compat": "0.10", "refcount_bits": 16}])),
    # lazy_refcounts switched off (the refcounts written, the image clean)
    # and on again between guest I/O
    _c("amend-lazy-refcounts-4k", setup=with_data, cluster_size=4096, lazy=True, nops=18,
       workload=amend_ops([{"lazy_refcounts": "off"}, {"lazy_refcounts": "on"}])),
    _c("bitmaps-64k", setup=with_data, workload=bitmap_ops, nops=24),
    # Backing chains (chain_ops.py): every file recorded, states cut across them.
    _c("commit-64k", setup=chain, workload=chain_op("commit", None, False), nops=16,
       untouched=(2,)),
    _c("commit-base-4k", setup=chain, cluster_size=4096, nops=16, untouched=(1,),
       workload=chain_op("commit", "base.qcow2", True)),
    _c("lazy-commit-intermediate-64k", setup=chain, lazy=True, nops=16,
       workload=chain_op("commit_intermediate")),
    _c("rebase-4k", setup=chain, cluster_size=4096, nops=16, untouched=(1, 2),
       workload=chain_op("rebase", "base.qcow2", "qcow2")),
    _c("rebase-standalone-64k", setup=chain, nops=16, untouched=(1, 2),
       workload=chain_op("rebase", "", None)),
    _c("bitmaps-4k-writethrough", setup=with_data, workload=bitmap_ops, cluster_size=4096,
       cache_mode="writethrough", nops=16),
]

BY_NAME = {c.name: c for c in CONFIGS}
