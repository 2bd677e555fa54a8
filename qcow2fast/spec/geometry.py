"""Image geometry: the sizes, shifts and masks that follow from the header
(cluster size, refcount width, extended L2 entries), computed once at open,
with named helpers for the common conversions (guest offset to L1/L2 index,
compressed descriptors, refcount structure sizes).  The formulas of the
shifts are the spec's, from :mod:`qcow2fast.spec.constants`."""

from .constants import (L2E_SIZE_EXTENDED, L2E_SIZE_NORMAL, QCOW_OFLAG_COMPRESSED,
                        REFTABLE_ENTRY_SIZE, coffset_mask, csize_mask, csize_shift, l2_bits,
                        rb_bits, unit_bits)
# Entry bits re-exported for modules that still import them from here; new
# code imports them from qcow2fast.spec.constants.
from .constants import (L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK,  # noqa: F401
                        L2E_STD_RESERVED_MASK, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO,
                        REFT_OFFSET_MASK, SC_ALLOC_MASK, SC_ZERO_SHIFT, SUBCLUSTERS)


class Geometry:
    __slots__ = ("cluster_bits", "cluster_size", "l2_bits", "l2_entries", "refcount_order",
                 "refcount_bits", "refcount_max", "rb_bits", "rb_entries", "csize_shift",
                 "csize_mask", "cluster_offset_mask", "slice_bits", "slice_entries",
                 "slice_bytes", "extended_l2", "l2_entry_bytes", "l2_entry_words",
                 "subcluster_bits", "subcluster_size", "unit_bits")

    def __init__(self, cluster_bits, refcount_order, l2_slice_bytes=None, extended_l2=False):
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        # An L2 entry is one 64-bit word, or two with extended L2 entries
        # (descriptor, subcluster bitmap).
        self.extended_l2 = bool(extended_l2)
        self.l2_entry_bytes = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE_NORMAL
        self.l2_entry_words = self.l2_entry_bytes // 8
        self.l2_bits = l2_bits(cluster_bits, self.extended_l2)
        self.l2_entries = 1 << self.l2_bits
        # The unit of allocation: the subcluster, or the cluster itself.
        self.subcluster_bits = unit_bits(cluster_bits, self.extended_l2)
        self.subcluster_size = 1 << self.subcluster_bits
        self.unit_bits = self.subcluster_bits
        self.refcount_order = refcount_order
        self.refcount_bits = 1 << refcount_order
        self.refcount_max = (1 << self.refcount_bits) - 1
        self.rb_bits = rb_bits(cluster_bits, refcount_order)    # log2 entries per refcount block
        self.rb_entries = 1 << self.rb_bits
        # Compressed cluster descriptor (spec: x = 62 - (cluster_bits - 8)).
        self.csize_shift = csize_shift(cluster_bits)
        self.csize_mask = csize_mask(cluster_bits)
        self.cluster_offset_mask = coffset_mask(cluster_bits)
        slice_bytes = l2_slice_bytes or self.cluster_size
        self.slice_bytes = slice_bytes
        self.slice_entries = slice_bytes // self.l2_entry_bytes
        self.slice_bits = self.slice_entries.bit_length() - 1

    # -- guest offsets ---------------------------------------------------------
    def offset_into_cluster(self, offset):
        return offset & (self.cluster_size - 1)

    def start_of_cluster(self, offset):
        return offset & ~(self.cluster_size - 1)

    def size_to_clusters(self, nbytes):
        return (nbytes + self.cluster_size - 1) >> self.cluster_bits

    def l1_index(self, offset):
        return offset >> (self.cluster_bits + self.l2_bits)

    def l2_index(self, offset):
        return (offset >> self.cluster_bits) & (self.l2_entries - 1)

    def l1_size_for(self, virtual_size):
        """L1 entries needed to map ``virtual_size`` bytes."""
        per_l2 = self.cluster_size * self.l2_entries
        return (virtual_size + per_l2 - 1) // per_l2

    def bytes_per_l2(self):
        return self.cluster_size << self.l2_bits

    # -- refcount structures ----------------------------------------------------
    def refblocks_covering(self, clusters):
        """Refcount blocks (refcount table entries) that cover host clusters
        [0, clusters)."""
        return -((-clusters) >> self.rb_bits)

    def reftable_clusters(self, entries):
        """Clusters of a refcount table with ``entries`` entries."""
        return -((-entries * REFTABLE_ENTRY_SIZE) >> self.cluster_bits)

    def refcount_layout(self, clusters):
        """(refcount blocks, refcount table clusters) that count host clusters
        [0, clusters) plus themselves, placed after them: the least fixed
        point (qemu's qcow2_refcount_metadata_size)."""
        blocks = table = 0
        while True:
            b = self.refblocks_covering(clusters + blocks + table)
            t = self.reftable_clusters(b)
            if (b, t) == (blocks, table):
                return blocks, table
            blocks, table = b, t

    # -- compressed clusters ---------------------------------------------------
    def compressed_extent(self, entry):
        """(host byte offset, byte length) of a compressed cluster descriptor."""
        coffset = entry & self.cluster_offset_mask
        nb_sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return coffset, nb_sectors * 512 - (coffset & 511)

    def compressed_descriptor(self, host, nbytes):
        """The L2 descriptor of ``nbytes`` of compressed data at host byte
        ``host`` (the inverse of compressed_extent): the sector count field
        is the number of 512-byte sectors touched beyond the first.  Works on
        ints and on numpy uint64 arrays alike.  Compressed clusters never
        carry QCOW_OFLAG_COPIED."""
        extra = ((host + nbytes - 1) >> 9) - (host >> 9)
        return host | (extra << self.csize_shift) | QCOW_OFLAG_COMPRESSED

    def compressed_clusters(self, entry):
        """Host cluster indices [first, last] touched by a compressed cluster."""
        coffset, csize = self.compressed_extent(entry)
        return coffset >> self.cluster_bits, (coffset + csize - 1) >> self.cluster_bits
