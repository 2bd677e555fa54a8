"""convert's units (convert.py): how a batch of units is read from the
sources and each unit's kind decided (data, zero, unallocated,
compressed), and the reused batch buffers."""

import mmap

import numpy as np

from .._ext.kernels import nonzero_units
from ..spec.constants import COMPRESSED, DATA, UNALLOCATED, ZERO
from .qcow2_writer import runs
from .sources import MUST_ZERO, READ


class Job:
    """How batches are read and turned into units' kinds and payloads."""

    def __init__(self, unit, *, detect_zeros, keep_zero, compress, v2_zero_as_data,
                 sparse_units=1, pace=None):
        self.unit = unit
        self.pace = pace                      # -r: ops/ratelimit.WriteRate or None
        self.detect_zeros = detect_zeros      # -S: all-zero units need no data
        # -S larger than a unit: zeros are skipped only in whole aligned groups
        # of this many units (qemu's alignment of its writes to -S)
        self.sparse_units = sparse_units
        self.keep_zero = keep_zero            # a zero unit is written as ZERO, not skipped
        self.compress = compress              # Compressor or None
        self.v2_zero_as_data = v2_zero_as_data

    def process(self, buf, nvalid, marks, src, first):
        """Read the READ units of the batch starting at unit ``first`` (when
        ``src`` is given), then decide each unit's kind.  Returns (kinds,
        payloads, the --salvage warnings of the batch)."""
        unit = self.unit
        count = len(marks)
        buf[nvalid:count * unit] = 0            # buffers are reused: past the end reads 0
        notes = []
        if src is not None:
            base = first * unit
            for a, b in runs(marks == READ):
                lo, hi = a * unit, min(b * unit, nvalid)
                src.readinto(base + lo, buf[lo:hi], notes)
        kinds = np.where(marks == MUST_ZERO, ZERO, UNALLOCATED).astype(np.uint8)
        data = marks == READ
        if self.detect_zeros:
            nonzero = np.empty(count, np.uint8)
            nonzero_units(buf[:count * unit], unit, nonzero)
            nonzero = nonzero.view(bool)
            if self.sparse_units > 1:
                group = (np.arange(first, first + count) // self.sparse_units)
                nonzero |= np.isin(group, group[data & nonzero])
            kinds[data & ~nonzero] = ZERO if self.keep_zero else UNALLOCATED
            data &= nonzero
        if self.v2_zero_as_data:
            for a, b in runs(marks == MUST_ZERO):
                buf[a * unit:b * unit] = 0
            data |= kinds == ZERO
        kinds[data] = DATA
        if self.compress is None:
            return kinds, None, notes           # the data clusters are those of buf
        payloads = []
        for i in np.flatnonzero(data):
            chunk = buf[i * unit:(i + 1) * unit]     # zeros past the source's end
            c = self.compress(chunk)
            if len(c) < unit:                   # clusters that do not shrink stay plain
                kinds[i] = COMPRESSED
                chunk = c
            payloads.append(chunk)
        return kinds, payloads, notes


class Buffers:
    """Batch buffers: page aligned (as qemu's qemu_blockalign; the kernel
    copies to and from them), reused once their batch is written (fresh
    pages cost more than the copy into them)."""

    def __init__(self, nbytes):
        self.nbytes, self.free = nbytes, []

    def get(self):
        if self.free:
            return self.free.pop()
        return np.frombuffer(mmap.mmap(-1, self.nbytes), np.uint8)

    def put(self, buf):
        self.free.append(buf)
