"""measure's refcount arithmetic (ops/measure.py): the refcount blocks and
table a number of clusters needs, counting themselves."""

from qcow2fast.ops.measure import refcount_metadata_size


def test_refcount_metadata_counts_itself():
    # One block of 16-bit refcounts covers 32768 clusters: 32766 data clusters
    # plus the block and the table fit exactly; one more needs a second block.
    assert refcount_metadata_size(32766, 65536, 4) == 2 * 65536
    assert refcount_metadata_size(32767, 65536, 4) == 3 * 65536
