"""measure's refcount arithmetic (ops/measure.py, over the one refcount
layout function, Geometry.refcount_layout): the refcount blocks and table a
number of clusters needs, counting themselves -- the least such."""

from hypothesis import given, settings, strategies as st

from qcow2fast.ops.measure import refcount_metadata_size
from qcow2fast.spec.geometry import Geometry


def refcount_structure_clusters(clusters, cluster_size, order):
    return Geometry(cluster_size.bit_length() - 1, order).refcount_layout(clusters)


def test_refcount_metadata_counts_itself():
    # One block of 16-bit refcounts covers 32768 clusters: 32766 data clusters
    # plus the block and the table fit exactly; one more needs a second block.
    assert refcount_metadata_size(32766, 65536, 4) == 2 * 65536
    assert refcount_metadata_size(32767, 65536, 4) == 3 * 65536


@given(st.integers(0, 1 << 40), st.integers(9, 21), st.integers(0, 6))
@settings(max_examples=500, deadline=None)
def test_refcount_structures_are_the_least_that_count_themselves(clusters, cluster_bits, order):
    cs = 1 << cluster_bits
    per_block = cs * 8 >> order
    per_table_cluster = cs // 8
    blocks, table = refcount_structure_clusters(clusters, cs, order)
    assert table == -(-blocks // per_table_cluster)
    # The blocks count every cluster, themselves and the table included...
    assert blocks * per_block >= clusters + blocks + table
    # ...and one block fewer (with the table it would need) would not.
    if blocks:
        fewer = blocks - 1
        assert fewer * per_block < clusters + fewer + -(-fewer // per_table_cluster)
    assert refcount_metadata_size(clusters, cs, order) == (blocks + table) * cs
