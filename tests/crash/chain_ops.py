"""Crash-state operations on backing chains: commit and rebase (the
harness records every file of the chain, so a state cuts across them).

What each promises, cut anywhere (all the chain's files are recorded, a
barrier orders only its own file):

- **commit** (``qcow2fast.commit``: the top's data into its backing file,
  or with ``base=`` every layer above into that one, or an intermediate
  layer into the layer below it): the image the guest uses shows exactly
  the same disk at every cut, through the chain as qemu and qcow2fast
  read it -- commit changes where data lives, never what the top shows
  (the target is flushed before the committed layer is emptied, and the
  emptying only drops what the target already holds).  The layer written
  into shows, through its own chain, in each sector its old content or
  the committed one (a sector being overwritten is old or new, never
  torn inside itself: the disk writes 512-byte sectors whole).  Every
  file checks clean (leaks allowed); durable once commit returned.
- **rebase** (safe mode): the image shows the same disk at every cut
  (clusters that differ are copied in, flushed, before one header write
  names the new backing file); nothing but the image is written.

The workloads write the top before and after the operation, so the
other files change only by it.
"""

import qcow2fast

from . import guest
from .guest import OPS, random_guest_op


def _reopen(img, step):
    """Close the image (its chain holds the lower layers' locks), run
    ``step(path)``, reopen it as before."""
    path, kw = img.path, img.open_kw
    img.close()
    step(path)
    img = qcow2fast.open(path, "r+", **kw)
    img.open_kw = kw
    return img


def _commit(img, base, drop, cache="writeback"):
    return _reopen(img, lambda p: qcow2fast.commit(p, base=base, drop=drop, cache=cache))


def _commit_intermediate(img):
    """The layer below the image committed into its own backing file (and
    emptied): the image reads through it."""
    below = img.backing.path
    return _reopen(img, lambda p: qcow2fast.commit(below))


def _rebase(img, backing, fmt):
    return _reopen(img, lambda p: qcow2fast.rebase(p, backing, backing_fmt=fmt))


OPS.update({
    "commit": (_commit, None),
    "commit_intermediate": (_commit_intermediate, None),
    "rebase": (_rebase, None),
})
guest.DURABLE_OPS |= {"commit", "commit_intermediate", "rebase"}


def chain_op(*op):
    """A workload: guest I/O on the top, ``op``, more guest I/O."""
    def workload(cfg, rng):
        ops = []
        for k in range(2):
            for _ in range(cfg.nops // 2):
                ops.append(random_guest_op(rng, cfg.size, cfg.max_write))
            ops.append(("flush",))
            if k == 0:
                ops.append(op)
        return ops
    return workload
