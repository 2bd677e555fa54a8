"""A tiny reference model of a disk image: a bytearray plus the rules.

``ModelImage`` applies every operation both to a qcow2fast image and to the
bytearray, and checks reads against it.  Discard is the one operation whose
result is not fully determined: each discarded byte may keep its old value,
read as zero, or (in an image with a backing file) read as the backing
file's byte.  The model checks that rule and then adopts what the image
reads.
"""

import numpy as np


class ModelImage:
    def __init__(self, img, initial=None, backing=None):
        self.img = img
        size = img.size
        if initial is None:
            initial = bytes(size)
        assert len(initial) == size
        self.data = bytearray(initial)
        # The content the backing chain would show through (None: no backing).
        self.backing = None if backing is None else bytes(backing)
        self.log = []

    @property
    def size(self):
        return len(self.data)

    def _note(self, *op):
        self.log.append(op)
        del self.log[:-40]

    def history(self):
        return "\n".join(repr(op) for op in self.log)

    def write(self, off, data):
        self._note("write", off, len(data))
        n = self.img.write(off, data)
        assert n in (None, len(data)), f"write returned {n}, expected {len(data)}"
        self.data[off:off + len(data)] = data

    def write_compressed(self, off, data, compressor=None):
        self._note("write_compressed", off, len(data))
        assert self.img.write_compressed(off, data, compressor) == len(data)
        self.data[off:off + len(data)] = data

    def write_zeroes(self, off, n, may_unmap=False):
        self._note("write_zeroes", off, n, may_unmap)
        self.img.write_zeroes(off, n, may_unmap=may_unmap)
        self.data[off:off + n] = bytes(n)

    def discard(self, off, n):
        self._note("discard", off, n)
        self.img.discard(off, n)
        got = np.frombuffer(self.img.read(off, n), dtype=np.uint8)
        old = np.frombuffer(bytes(self.data[off:off + n]), dtype=np.uint8)
        ok = (got == old) | (got == 0)
        if self.backing is not None:
            ok |= got == np.frombuffer(self.backing[off:off + n], dtype=np.uint8)
        if not ok.all():
            bad = int(np.argmin(ok))
            raise AssertionError(
                f"discard({off:#x}, {n}): byte {off + bad:#x} reads {got[bad]:#x}, which is "
                f"neither the old value {old[bad]:#x}, zero, nor the backing file's byte\n"
                + self.history())
        self.data[off:off + n] = got.tobytes()

    def flush(self):
        self._note("flush")
        self.img.flush()

    def check_read(self, off, n):
        got = self.img.read(off, n)
        if got != self.data[off:off + n]:
            i = next(i for i in range(n) if got[i] != self.data[off + i])
            raise AssertionError(
                f"read({off:#x}, {n}) differs from the model at {off + i:#x}: "
                f"{got[i]:#x} != {self.data[off + i]:#x}\nrecent ops:\n" + self.history())

    def check_all(self):
        self.check_read(0, self.size)

    # -------------------------------------------------------------- random ops
    def random_ops(self, rng, count, *, discard=True, max_len=None):
        """Apply ``count`` random operations (unaligned and aligned)."""
        size = self.size
        cs = self.img.cluster_size
        max_len = max_len or min(size, 3 * cs + 1024, 512 * 1024)
        for _ in range(count):
            r = rng.random()
            if r < 0.40:                                   # unaligned data write
                off, n = rng.span(size, max_len)
                self.write(off, rng.randbytes(n))
            elif r < 0.50:                                 # whole clusters
                c = rng.randrange(0, size // cs) if size >= cs else 0
                n = min(cs * rng.randint(1, 2), size - c * cs)
                if n > 0:
                    self.write(c * cs, rng.randbytes(n))
            elif r < 0.58:                                 # small, across a boundary
                c = rng.randrange(1, max(2, size // cs))
                off = max(0, min(c * cs - rng.randint(1, 600), size - 1))
                n = min(rng.randint(1, 1200), size - off)
                self.write(off, rng.randbytes(n))
            elif r < 0.72:                                 # unaligned zeroes
                off, n = rng.span(size, max_len)
                self.write_zeroes(off, n, may_unmap=rng.random() < 0.5)
            elif r < 0.80:                                 # aligned zeroes
                c = rng.randrange(0, max(1, size // cs))
                n = min(cs * rng.randint(1, 3), size - c * cs)
                if n > 0:
                    self.write_zeroes(c * cs, n, may_unmap=rng.random() < 0.5)
            elif r < 0.92 and discard:
                if rng.random() < 0.5:
                    c = rng.randrange(0, max(1, size // cs))
                    n = min(cs * rng.randint(1, 3), size - c * cs)
                    off = c * cs
                else:
                    off, n = rng.span(size, max_len)
                if n > 0:
                    self.discard(off, n)
            elif r < 0.96:
                self.flush()
            else:
                off, n = rng.span(size, max_len)
                self.check_read(off, n)
