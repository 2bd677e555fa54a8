"""Instructions per 4 KiB in-place overwrite through the C write path, with
and without write observers (dirty bitmaps), for callgrind A/B runs:

    valgrind --tool=callgrind --callgrind-out-file=OUT python scripts/callgrind_write.py N K

N writes after a warm-up of N writes; K enabled DirtyBitmap observers
(0: none).  Compare two runs of different N (same K) to cancel start-up:
instructions per write = (Ir(N2) - Ir(N1)) / (N2 - N1) / 2.
"""

import os
import sys
import tempfile

import qcow2fast
from qcow2fast._ext.hooks import DirtyBitmap


def main():
    n, k = int(sys.argv[1]), int(sys.argv[2])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "w.qcow2")
        qcow2fast.create(path, 64 << 20)
        with qcow2fast.open(path, "r+", cache_clean_interval=0) as img:
            img.write(0, bytes(16 << 20))                   # allocated: writes are in place
            for _ in range(k):
                img.add_write_observer(DirtyBitmap(img.size, 65536))
            data = b"\xa5" * 4096
            write = img.write
            for rnd in range(2):                            # warm-up, then the measured pass
                for i in range(n):
                    write((i * 4096) % (4 << 20), data)


if __name__ == "__main__":
    main()
