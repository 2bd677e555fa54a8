"""qemu-img's ``-r RATE`` (convert, commit): writes paced to at most RATE
bytes per second on average, as qemu's throttling of the target
(THROTTLE_BPS_WRITE for convert, the commit job's speed)."""

import time


class WriteRate:
    """Called before each write: waits while the bytes written before it
    are ahead of ``rate`` times the time since the first write (a leaky
    bucket one write deep, as qemu's throttle lets a request through once
    the earlier ones have drained)."""

    def __init__(self, rate):
        if rate <= 0:
            raise ValueError(f"a rate limit must be positive, not {rate}")
        self.rate = rate
        self.start = None
        self.written = 0

    def admit(self, nbytes):
        now = time.monotonic()
        if self.start is None:
            self.start = now
        ahead = self.written / self.rate - (now - self.start)
        if ahead > 0:
            time.sleep(ahead)
        self.written += nbytes


def paced(rate):
    """A WriteRate for ``rate`` bytes/s, or None for no limit (0 or None)."""
    return WriteRate(rate) if rate else None
