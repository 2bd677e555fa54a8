"""ImageState.zero_from: every host byte at or past it reads as zero (an
allocating write into fresh space skips the untouched edges of its
clusters on that promise).  New L2 tables, L1 tables, refcount blocks and
refcount tables written past it must move it (they were not: a data
cluster later reusing such a cluster would show their bytes)."""

import qcow2fast
from tests.helpers.qemu_util import qemu_check

MiB = 1 << 20


def _zeros_past_zero_from(img):
    s = img.state
    size = img.file.size()
    if s.zero_from >= size:
        return True
    return not any(img.file.pread(s.zero_from, size - s.zero_from))


def test_metadata_written_past_zero_from_moves_it(tmp_path):
    base = str(tmp_path / "base.qcow2")
    qcow2fast.create(base, 4 << 30, cluster_size=65536)
    with qcow2fast.open(base, "r+") as b:
        b.write(0, b"\x11" * (24 * MiB))
    path = str(tmp_path / "a.qcow2")
    # 512 B clusters: an L2 table maps 32 KiB, a refcount block counts 128 KiB
    qcow2fast.create(path, 4 << 30, cluster_size=512, backing_file=base, backing_format="qcow2")
    with qcow2fast.open(path, "r+", cache_clean_interval=0) as img:
        # zeros over the backing file's data: new L2 tables holding only
        # zero flags (no data cluster after them)
        img.write_zeroes(1 * MiB, 512)
        img.flush()
        assert _zeros_past_zero_from(img), "an L2 table past zero_from"
        # 400 more: new refcount blocks and a grown refcount table
        for k in range(400):
            img.write_zeroes(2 * MiB + k * 32 * 1024, 512)
        img.flush()
        assert _zeros_past_zero_from(img), "refcount structures past zero_from"
        # a grown L1 table (the VM state area past the disk)
        img.write_vmstate(8 << 30, b"\x01" * 512)
        img.flush()
        assert _zeros_past_zero_from(img), "an L1 table past zero_from"
    qemu_check(path)
