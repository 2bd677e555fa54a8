"""The spec's one table of constants and kinds, header field packing and the
refcount structure sizes, checked against values written down independently
(tests/qemu_util.py, docs/interop/qcow2.txt) and against brute force."""

import struct

import numpy as np
import pytest

from qcow2fast._ext import kernels
from qcow2fast.ops.measure import refcount_metadata_size
from qcow2fast.spec import constants as C
from qcow2fast.spec import entries
from qcow2fast.spec.geometry import Geometry
from qcow2fast.spec.header import FIELD_OFFSET, HEADER, HEADER_FIELDS, Header, pack_fields
from tests.helpers import qemu_util as Q


def test_entry_bits_match_the_spec():
    assert C.L1E_OFFSET_MASK == Q.L1E_OFFSET_MASK
    assert C.L2E_OFFSET_MASK == Q.L2E_OFFSET_MASK
    assert C.QCOW_OFLAG_COPIED == Q.QCOW_OFLAG_COPIED
    assert C.QCOW_OFLAG_COMPRESSED == Q.QCOW_OFLAG_COMPRESSED
    assert C.QCOW_OFLAG_ZERO == Q.QCOW_OFLAG_ZERO
    # qcow2.txt: refcount table entry bits 0-8 reserved, 9-63 the block offset
    assert C.REFT_RESERVED_MASK == (1 << 9) - 1
    assert C.REFT_OFFSET_MASK == (1 << 64) - (1 << 9)
    # L1: bits 0-8 and 56-62 reserved; L2 (standard): bits 1-8 and 56-61
    bits = lambda *ranges: sum(1 << b for lo, hi in ranges for b in range(lo, hi + 1))
    assert C.L1E_RESERVED_MASK == bits((0, 8), (56, 62))
    assert C.L2E_STD_RESERVED_MASK == bits((1, 8), (56, 61))
    assert C.SC_ALLOC_MASK == bits((0, 31)) and C.SC_ZERO_SHIFT == 32
    assert C.SUBCLUSTERS == 1 << C.SC_BITS == 32
    assert (C.L1E_SIZE, C.L2E_SIZE_NORMAL, C.L2E_SIZE_EXTENDED, C.REFTABLE_ENTRY_SIZE) \
        == (8, 8, 16, 8)


def test_kinds_and_their_public_names():
    assert sorted(C.EXTENT_KINDS) == sorted(Q.KINDS)
    assert {k.label for k in C.Kind} == set(Q.KINDS) | {"invalid"}
    assert C.Kind.INVALID not in C.KIND_NAMES
    for k in C.Kind:
        assert getattr(C, k.name) == int(k)
    samples = {0: C.Kind.UNALLOCATED, C.QCOW_OFLAG_COPIED | 0x10000: C.Kind.DATA,
               C.QCOW_OFLAG_ZERO: C.Kind.ZERO, C.QCOW_OFLAG_COMPRESSED | 0x200: C.Kind.COMPRESSED,
               0x10000 | 0x2: C.Kind.INVALID}
    for entry, kind in samples.items():
        assert kernels.l2_entry_kind(entry) == kind


def test_table_helpers():
    l2 = np.array([0, C.QCOW_OFLAG_COPIED | 0x30000, C.QCOW_OFLAG_COMPRESSED | 0x30000,
                   0x40000 | 0x2, C.QCOW_OFLAG_ZERO], dtype=np.uint64)
    assert entries.is_compressed(l2).tolist() == [False, False, True, False, False]
    assert entries.standard_allocated(l2).tolist() == [False, True, False, True, False]
    assert entries.l2_reserved(l2).tolist() == [False, False, False, True, False]
    assert entries.has_copied(l2).tolist() == [False, True, False, False, False]
    raw = l2.astype(">u8").tobytes()
    assert np.array_equal(entries.decode_table(raw), l2)
    bm = np.array([(0x3 << 32) | 0x5], dtype=np.uint64)
    assert int(entries.sc_alloc_bits(bm)[0]) == 0x5 and int(entries.sc_zero_bits(bm)[0]) == 0x3


def test_pack_fields_matches_the_header_layout():
    h = Header(size=5 << 30, l1_size=7, l1_table_offset=0x30000, refcount_table_offset=0x10000,
               refcount_table_clusters=2, incompatible_features=0x10)
    image = h.pack()
    for first in range(1, len(HEADER_FIELDS)):
        for n in (1, 2, 3):
            names = HEADER_FIELDS[first:first + n]
            if len(names) < n:
                continue
            off, data = pack_fields(**{f: getattr(h, f) for f in names})
            assert off == FIELD_OFFSET[names[0]]
            assert image[off:off + len(data)] == data, names
    assert pack_fields(l1_size=3, l1_table_offset=0x50000) == \
        (36, struct.pack(">IQ", 3, 0x50000))
    with pytest.raises(ValueError):
        pack_fields(l1_table_offset=0x50000, l1_size=3)       # not in header order
    with pytest.raises(ValueError):
        pack_fields(l1_size=3, refcount_table_offset=0x10000)  # not consecutive
    assert HEADER.size == 104


@pytest.mark.parametrize("cluster_bits", [9, 12, 16])
@pytest.mark.parametrize("order", [0, 4, 6])
def test_refcount_layout_is_the_least_fixed_point(cluster_bits, order):
    geo = Geometry(cluster_bits, order)
    assert geo.rb_entries == (1 << cluster_bits) * 8 >> order
    per_table = (1 << cluster_bits) // 8
    for clusters in list(range(0, 70)) + [geo.rb_entries - 2, geo.rb_entries - 1,
                                          geo.rb_entries, 5 * geo.rb_entries + 3]:
        blocks, table = geo.refcount_layout(clusters)
        total = clusters + blocks + table
        # enough: the blocks count everything, the table holds every block
        assert blocks * geo.rb_entries >= total and table * per_table >= blocks
        # least: brute force over the smaller candidates
        for b in range(blocks):
            t = -(-b // per_table)
            assert b * geo.rb_entries < clusters + b + t
        assert refcount_metadata_size(clusters, 1 << cluster_bits, order) \
            == (blocks + table) << cluster_bits


def test_geometry_shifts():
    std, ext = Geometry(16, 4), Geometry(16, 4, extended_l2=True)
    assert (std.l2_bits, std.l2_entry_bytes, std.unit_bits) == (13, 8, 16)
    assert (ext.l2_bits, ext.l2_entry_bytes, ext.unit_bits) == (12, 16, 11)
    assert std.l1_size_for(1 << 29) == 1 and ext.l1_size_for(1 << 29) == 2
    assert std.csize_shift == 62 - (16 - 8) and std.csize_mask == 0xFF
    assert std.cluster_offset_mask == (1 << std.csize_shift) - 1
