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
