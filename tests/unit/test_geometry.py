"""Geometry (spec/geometry.py): the sizes, shifts and masks derived from
the header, for every cluster size (512 B..2 MiB), refcount order (0..6)
and L2 entry width, checked against the arithmetic of qcow2.txt; the
compressed cluster descriptor round trip; L1 sizes as qemu-img sizes them."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qcow2fast.spec.geometry import QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, Geometry
from tests.helpers.qemu_util import (compressed_descriptor, header, make_compressed_entry,
                                     qemu_create)

CLUSTER_BITS = range(9, 22)
REFCOUNT_ORDERS = range(0, 7)
# Extended L2 entries need 32 subclusters of at least 512 bytes: 16 KiB clusters.
LAYOUTS = [(cb, ext) for cb in CLUSTER_BITS for ext in (False, True) if cb >= 14 or not ext]


def layout_id(layout):
    cb, ext = layout
    return f"cs{1 << cb}" + ("-extl2" if ext else "")


def geometries(layout):
    """(Geometry, refcount order) for every refcount width of the layout."""
    cb, ext = layout
    for order in REFCOUNT_ORDERS:
        yield Geometry(cb, order, extended_l2=ext), order


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_sizes(layout):
    cb, ext = layout
    for geo, order in geometries(layout):
        check_sizes(geo, cb, order, ext)


def check_sizes(geo, cb, order, ext):
    cs = 1 << cb
    entry = 16 if ext else 8
    assert geo.cluster_size == cs
    assert geo.l2_entry_bytes == entry and geo.l2_entry_words == entry // 8
    assert geo.l2_entries == cs // entry == 1 << geo.l2_bits
    assert geo.bytes_per_l2() == cs * geo.l2_entries
    where = f"refcount_order {order}"
    assert geo.refcount_bits == 1 << order, where
    assert geo.refcount_max == (1 << (1 << order)) - 1, where
    assert geo.rb_entries == cs * 8 // (1 << order) == 1 << geo.rb_bits, where
    if ext:
        assert geo.subcluster_size == cs // 32 >= 512
    else:
        assert geo.subcluster_size == cs
    assert geo.unit_bits == geo.subcluster_bits
    # Compressed descriptor fields (qcow2.txt: x = 62 - (cluster_bits - 8)).
    assert geo.csize_shift == 62 - (cb - 8)
    assert geo.csize_mask == (1 << (cb - 8)) - 1
    assert geo.cluster_offset_mask == (1 << geo.csize_shift) - 1
    # The sector-count field fits between the offset and the flag bits.
    assert (geo.csize_mask << geo.csize_shift) >> 62 == 0
    assert (geo.csize_mask << geo.csize_shift) & geo.cluster_offset_mask == 0
    # Slices: the whole table by default.
    assert geo.slice_bytes == cs and geo.slice_entries == geo.l2_entries


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_slices(layout):
    cb, ext = layout
    for slice_bits in range(9, cb + 1):
        geo = Geometry(cb, 4, l2_slice_bytes=1 << slice_bits, extended_l2=ext)
        assert geo.slice_bytes == 1 << slice_bits
        assert geo.slice_entries == (1 << slice_bits) // geo.l2_entry_bytes
        assert 1 << geo.slice_bits == geo.slice_entries
        assert geo.l2_entries % geo.slice_entries == 0


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_guest_and_host_indices(layout):
    cb, ext = layout
    rng = np.random.default_rng(cb * 2 + ext)
    for geo, _ in geometries(layout):
        check_indices(geo, rng)


def check_indices(geo, rng):
    cs = geo.cluster_size
    for offset in [0, 1, cs - 1, cs, geo.bytes_per_l2() - 1, geo.bytes_per_l2(),
                   *map(int, rng.integers(0, 1 << 56, 50))]:
        assert geo.start_of_cluster(offset) + geo.offset_into_cluster(offset) == offset
        assert geo.start_of_cluster(offset) % cs == 0 and geo.offset_into_cluster(offset) < cs
        assert 0 <= geo.l2_index(offset) < geo.l2_entries
        assert (geo.l1_index(offset) * geo.bytes_per_l2() + geo.l2_index(offset) * cs
                + geo.offset_into_cluster(offset)) == offset
        assert geo.size_to_clusters(offset) == -(-offset // cs)
        cluster = offset // cs
        where = f"refcount_order {geo.refcount_order}, cluster {cluster}"
        assert ((cluster >> geo.rb_bits) * geo.rb_entries
                + (cluster & (geo.rb_entries - 1))) == cluster, where
        assert geo.rb_entries == 1 << geo.rb_bits, where


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_l1_size_for(layout):
    cb, ext = layout
    geo = Geometry(cb, 4, extended_l2=ext)
    per_l2 = geo.bytes_per_l2()
    assert geo.l1_size_for(0) == 0
    assert geo.l1_size_for(1) == 1
    assert geo.l1_size_for(per_l2) == 1
    assert geo.l1_size_for(per_l2 + 1) == 2
    assert geo.l1_size_for(7 * per_l2 - 512) == 7
    # Every guest offset below the size has an L1 entry, and no entry is spare.
    for size in (512, 3 * per_l2 + 4096, (1 << 44) + 512):
        n = geo.l1_size_for(size)
        assert geo.l1_index(size - 1) == n - 1


@pytest.mark.qemu
@pytest.mark.parametrize("cs,ext,size", [(512, False, 100 << 20), (4096, False, (5 << 30) + 512),
                                         (65536, False, 1 << 40), (65536, True, (1 << 40) - 512),
                                         (16384, True, 3 << 30), (2 << 20, False, 1 << 44)])
def test_l1_size_for_matches_qemu_img_create(tmp_path, cs, ext, size):
    path = qemu_create(tmp_path / "l1.qcow2", size, cluster_size=cs,
                       extended_l2="on" if ext else "off")
    h = header(path)
    geo = Geometry(h["cluster_bits"], h["refcount_order"], extended_l2=ext)
    assert h["l1_size"] == geo.l1_size_for(size)


# -- compressed clusters ---------------------------------------------------------------


@st.composite
def compressed_extents(draw):
    """(cluster_bits, host byte offset, compressed length): any offset the
    descriptor can hold, any length its sector count can express."""
    cb = draw(st.integers(9, 21))
    geo = Geometry(cb, 4)
    host = draw(st.integers(0, geo.cluster_offset_mask))
    max_len = (geo.csize_mask + 1) * 512 - (host & 511)
    nbytes = draw(st.integers(1, max_len))
    return cb, host, nbytes


@given(compressed_extents())
@settings(max_examples=2000, deadline=None)
def test_compressed_descriptor_round_trip(x):
    cb, host, nbytes = x
    geo = Geometry(cb, 4)
    entry = geo.compressed_descriptor(host, nbytes)
    assert entry & QCOW_OFLAG_COMPRESSED and not entry & QCOW_OFLAG_COPIED
    assert entry < 1 << 64
    # The spec's own decoding (the test helpers') sees the same descriptor.
    sectors_beyond_first = ((host + nbytes - 1) >> 9) - (host >> 9)
    assert compressed_descriptor(entry, cb) == (host, sectors_beyond_first)
    assert entry == make_compressed_entry(host, sectors_beyond_first, cb)
    # compressed_extent gives back the offset and a length that covers the
    # data up to the end of its last sector.
    off, length = geo.compressed_extent(entry)
    assert off == host
    assert nbytes <= length < nbytes + 512
    assert (off + length) % 512 == 0
    first, last = geo.compressed_clusters(entry)
    assert first == host >> cb and last == (host + length - 1) >> cb
    assert last - first <= 2              # at most two clusters of data, and a sector
    # Descriptors of the same extent stay equal after decode/encode.
    assert geo.compressed_descriptor(*geo.compressed_extent(entry)) == entry


@given(st.integers(9, 21), st.data())
@settings(max_examples=100, deadline=None)
def test_compressed_descriptor_on_numpy_arrays(cb, data):
    """compressed_descriptor works element-wise on uint64 arrays."""
    geo = Geometry(cb, 4)
    pairs = data.draw(st.lists(st.tuples(st.integers(0, geo.cluster_offset_mask),
                                         st.integers(1, geo.cluster_size)),
                               min_size=1, max_size=20))
    hosts = np.array([h for h, _ in pairs], np.uint64)
    lens = np.array([n for _, n in pairs], np.uint64)
    entries = geo.compressed_descriptor(hosts, lens)
    assert [int(e) for e in entries] == [geo.compressed_descriptor(h, n) for h, n in pairs]
