"""Crash states, the guest side: the expected content of an image
(:class:`GuestModel`), the operations a workload records (``OPS``: how
the child runs each one and what it does to the model), the registries
other modules extend (what is durable or atomic, extra checks, allowed
check errors), and :class:`Config`, one configuration of the harness."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SECTOR = 512
MiB = 1 << 20


class GuestModel:
    """The expected guest content of an image (numpy uint8 of the disk)."""

    def __init__(self, data, unit, cluster=None):
        self.data = data
        self.unit = unit        # discard's granularity: the cluster, or subcluster
        self.cluster = cluster or unit
        # The bytes past the disk's end in its last, partial cluster: a
        # shrink keeps that cluster whole (qemu frees only whole clusters
        # past the new end), and a later grow shows them again, in qemu as
        # here.  (Random guest ops never reach the disk's end, so only a
        # resize changes them.)
        self.tail = np.zeros(0, np.uint8)
        self.snaps = {}         # internal snapshot name -> its disk
        self.bitmaps = {}       # dirty bitmap name -> (granularity, bool per granule)

    def copy(self):
        m = GuestModel(self.data.copy(), self.unit, self.cluster)
        m.tail = self.tail.copy()
        m.snaps = dict(self.snaps)              # snapshot disks are never changed in place
        m.bitmaps = {k: (g, b.copy()) for k, (g, b) in self.bitmaps.items()}
        return m

    def touch(self, off, n):
        """A guest write of [off, off+n): every enabled bitmap marks it."""
        for gran, bits in self.bitmaps.values():
            bits[off // gran:-(-(off + n) // gran)] = True


def _write(img, off, data):
    img.write(off, data)


def _model_write(m, off, data):
    m.data[off:off + len(data)] = np.frombuffer(data, np.uint8)
    m.touch(off, len(data))


def _zero(img, off, n, unmap):
    img.write_zeroes(off, n, may_unmap=unmap)


def _model_zero(m, off, n, unmap):
    m.data[off:off + n] = 0
    m.touch(off, n)


def _discard(img, off, n):
    img.discard(off, n)


def _model_discard(m, off, n):
    a = -(-off // m.unit) * m.unit
    b = (off + n) // m.unit * m.unit
    if b > a:
        m.data[a:b] = 0
    m.touch(off, n)


def _compressed(img, off, data):
    img.write_compressed(off, data)


def _flush(img):
    img.flush()


# name: (run in the child on the open Image, effect on a GuestModel or None)
OPS = {
    "write": (_write, _model_write),
    "zero": (_zero, _model_zero),
    "discard": (_discard, _model_discard),
    "compressed": (_compressed, _model_write),
    "flush": (_flush, None),
}
# Operations acknowledged (durable) when they return, in every cache mode;
# ATOMIC ones leave, cut anywhere, the whole guest disk as before or after
# them (their workloads put flushes around them so nothing else is in flight).
DURABLE_OPS = {"flush"}
ATOMIC_OPS = set()
# check(rec, state, path, models, fail) run on every state: models are the
# GuestModels the state may hold (after ops[:durable] ... ops[:started]).
STATE_CHECKS = []
# Whether a state may show qemu-compatible check errors (messages) that a
# crash inside one of its in-flight operations can leave: allow(rec, state, lines).
ALLOWED_ERRORS = []


def resized(m, n):
    """``m`` with its disk made ``n`` bytes: the bytes a grow adds read as
    the hidden tail of the old last cluster (``GuestModel.tail``), then
    zeros; a shrink hides the bytes past the new end up to its cluster's end."""
    ext = np.concatenate([m.data, m.tail])
    m.data = _sized(ext, n)
    m.tail = _sized(ext[n:], -(-n // m.cluster) * m.cluster - n)


def _sized(data, n):
    """``data`` cut or zero-padded to ``n`` bytes (a resize's effect)."""
    return data[:n] if len(data) >= n else np.concatenate([data, np.zeros(n - len(data),
                                                                           np.uint8)])


def random_guest_op(rng, top, max_len):
    """A random write (65%), zero (15%, with or without unmap) or discard of
    512 B to ``max_len`` bytes below guest offset ``top``; most are sector
    aligned, some not."""
    n = int(rng.integers(512, max_len + 1))
    off = int(rng.integers(0, top - n))
    if rng.random() < 0.7:
        off -= off % SECTOR
        n -= n % SECTOR
    r = rng.random()
    if r < 0.65:
        return ("write", off, rng.bytes(n))
    if r < 0.8:
        return ("zero", off, n, bool(rng.random() < 0.5))
    return ("discard", off, n)


def further_workload(cfg, rng, size=None):
    return [random_guest_op(rng, size or cfg.size, 70000) for _ in range(6)]


@dataclass
class Config:
    """One crash-state configuration: how the image is made (``setup``), the
    guest operations recorded on it (``workload``), how it is opened."""
    name: str
    setup: object                       # setup(cfg, dir, rng) -> image path, or [paths]
    workload: object                    # workload(cfg, rng) -> [(op, *args)]
    size: int = 16 * MiB
    cluster_size: int = 65536
    cache_mode: str = "writeback"
    lazy: bool = False
    extended_l2: bool = False
    compat: str = "1.1"
    refcount_bits: int = 16
    open_kw: dict = field(default_factory=dict)
    nops: int = 40
    max_write: int = 320 * 1024
    # A setup returning several paths (a backing chain) has all of them
    # recorded; the first is the image the guest uses.  ``untouched``: the
    # indexes of those the workload must not write at all.
    untouched: tuple = ()
    # The setup's last ``aux_files`` paths are not images (an external data
    # file): recorded and cut into states with the others, checked through
    # the image that names them.
    aux_files: int = 0
    # A LUKS image's passphrase: every open and qemu-img call passes it.
    secret: str | None = None

    @property
    def read_kw(self):
        """What qcow2fast.open needs beyond the path (the key of a LUKS image)."""
        return {"key_secret": self.secret} if self.secret else {}

    def qemu_args(self, path):
        """How qemu-img names the image at ``path`` (the secret object and
        --image-opts for a LUKS image)."""
        if not self.secret:
            return [path]
        return ["--object", f"secret,id=sec0,data={self.secret}", "--image-opts",
                f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"]

    @property
    def durable_on_return(self):
        return self.cache_mode in ("writethrough", "directsync")

    @property
    def unit(self):
        return self.cluster_size // 32 if self.extended_l2 else self.cluster_size
