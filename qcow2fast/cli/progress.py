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

    def __init__(self, enabled, min_skip):
        self.enabled = enabled
        self.min_skip = min_skip
        self.last = None

    def __call__(self, done, total):
        if not self.enabled:
            return
        current = min(100.0, 100.0 * done / total) if total else 100.0
        if current != self.last and (self.last is None or abs(current - self.last) > self.min_skip
                                     or current in (0.0, 100.0)):
            self.last = current
            sys.stdout.write(f"    ({current:3.2f}/100%)\r")
            sys.stdout.flush()

    def close(self):
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()
