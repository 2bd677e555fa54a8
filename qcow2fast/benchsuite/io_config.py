"""io_bench's fixed parameters: request and cluster sizes, data patterns,
engines, scenarios and the size of each mode."""

import re

from .common import GiB, KiB, MiB

REQ = 4 * KiB                      # request size, both engines
CLUSTER = 64 * KiB                 # cluster size of every image
SCATTER_STEP = 7919 * REQ          # prime number of 4 KiB blocks (~31 MiB)
FILL_PATTERN = 0x5A                # data of the pre-written image
WRITE_PATTERN = 0xA5               # data every benchmark write carries
CHECK_PATTERN = 0xC3               # data of the (untimed) overwrite check

ENGINES = ("qemu", "qemu1", "qcow2fast", "raw", "host")
ENGINE_LABEL = {"qemu": "qemu-img", "qemu1": "qemu-img 1cpu", "qcow2fast": "qcow2fast",
                "raw": "raw", "host": "host"}
QEMU_ENGINES = ("qemu", "qemu1")

# name, kind, step, count key
SCENARIOS = [
    ("read-seq", "read", REQ, "read_count"),
    ("read-scatter", "read", SCATTER_STEP, "read_count"),
    ("overwrite-seq", "overwrite", REQ, "overwrite_count"),
    ("overwrite-scatter", "overwrite", SCATTER_STEP, "overwrite_count"),
    ("alloc-S64K", "alloc", CLUSTER, "alloc64_count"),
    ("alloc-S4K", "alloc", REQ, "alloc4_count"),
]

# Request counts.  None: derived from the data image size -- the reads touch
# every 4 KiB block once (size / 4 KiB), the S=64K allocating writes fill
# every cluster of an image of that size (size / 64 KiB).
MODES = {
    "full": dict(size=1 * GiB, runs=5, read_count=None, overwrite_count=32_768,
                 alloc64_count=None, alloc4_count=65_536),
    "quick": dict(size=256 * MiB, runs=3, read_count=None, overwrite_count=10_000,
                  alloc64_count=None, alloc4_count=16_384),
}
DERIVED_COUNT = {"read_count": REQ, "alloc64_count": CLUSTER}   # size // this

RUN_RE = re.compile(r"Run completed in ([0-9.]+) seconds\.")
SEND_RE = re.compile(r"Sending (\d+) (read|write) requests, (\d+) bytes each, (\d+) in "
                     r"parallel \(starting at offset (\d+), step size (\d+)\)")
