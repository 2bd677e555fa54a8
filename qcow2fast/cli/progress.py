"""``-p``: a progress bar on stderr when it is a terminal (tqdm), nothing
otherwise, so scripts and pipes see the same output as without -p."""

import shutil
import sys


class Progress:
    def __init__(self, enabled, total, desc):
        self._bar = None
        if enabled and total and sys.stderr.isatty():
            # A terminal that reports no size (0x0) would hide tqdm's bar:
            # fall back to 80x24.
            from tqdm import tqdm        # imported only when a bar is drawn
            size = shutil.get_terminal_size((80, 24))
            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                             unit_divisor=1024, file=sys.stderr, leave=False,
                             ncols=size.columns or 80, nrows=size.lines or 24)

    def advance_to(self, done):
        if self._bar is not None:
            self._bar.update(done - self._bar.n)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PercentProgress:
    """qemu-img's own ``-p`` output, which commit and rebase keep (scripts
    read it): ``    (NN.NN/100%)\\r`` on stdout whenever the figure moved by
    ``min_skip`` points or reached 0 or 100, and a newline at the end."""

    def __init__(self, enabled, min_skip, repeat_ends=False):
        self.enabled = enabled
        self.min_skip = min_skip
        self.repeat_ends = repeat_ends      # 0 and 100 printed each time (qemu_progress_print)
        self.last = None

    def __call__(self, done, total):
        if not self.enabled:
            return
        current = min(100.0, 100.0 * done / total) if total else 100.0
        ends = current in (0.0, 100.0)
        if (self.last is None or abs(current - self.last) > self.min_skip
                or ends and (self.repeat_ends or current != self.last)):
            self.last = current
            sys.stdout.write(f"    ({current:3.2f}/100%)\r")
            sys.stdout.flush()

    def close(self):
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()


class ConvertPercent(PercentProgress):
    """qemu-img convert's own ``-p`` lines: the share of the sources' data
    (their data extents, in qemu's chunks of at most IO_BUF_SIZE from each
    extent's start) written so far, one step per chunk; 0 and 100 are
    printed every time they are reached, as qemu_progress_print does.
    ``data`` are the (start, end) guest ranges of data, in disk order."""

    IO_BUF_SIZE = 2 << 20       # qemu-img.c's convert buffer

    def __init__(self, enabled, data):
        super().__init__(enabled, 1.0)
        self.steps = [(min(at + self.IO_BUF_SIZE, end), min(self.IO_BUF_SIZE, end - at))
                      for start, end in data for at in range(start, end, self.IO_BUF_SIZE)]
        self.total = sum(n for _, n in self.steps)
        self.copied = 0
        self._show(0.0)

    def _show(self, current):
        if self.enabled and (current in (0.0, 100.0) or abs(current - self.last) > self.min_skip):
            self.last = current
            sys.stdout.write(f"    ({current:3.2f}/100%)\r")
            sys.stdout.flush()

    def __call__(self, done, total):
        while self.steps and self.steps[0][0] <= done:
            self.copied += self.steps.pop(0)[1]
            self._show(min(100.0, 100.0 * self.copied / self.total))

    def close(self):
        self._show(100.0)
        super().close()
