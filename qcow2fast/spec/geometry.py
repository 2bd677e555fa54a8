"""Image geometry: every size, shift and mask derived from the header, computed
once at open.  Call sites use these helpers, never ad-hoc shifts."""

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE


# Extended L2 entries: 32 subclusters per cluster; the bitmap word holds the
# allocation bits (0-31) and the reads-as-zero bits (32-63).
SUBCLUSTERS = 32
SC_ALLOC_MASK = 0xFFFFFFFF
SC_ZERO_SHIFT = 32


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
        self.l2_entry_words = 2 if extended_l2 else 1
        self.l2_entry_bytes = 8 * self.l2_entry_words
        self.l2_bits = cluster_bits - (4 if extended_l2 else 3)
        self.l2_entries = 1 << self.l2_bits
        # The unit of allocation: the subcluster, or the cluster itself.
        self.subcluster_bits = cluster_bits - 5 if extended_l2 else cluster_bits
        self.subcluster_size = 1 << self.subcluster_bits
        self.unit_bits = self.subcluster_bits
        self.refcount_order = refcount_order
        self.refcount_bits = 1 << refcount_order
        self.refcount_max = (1 << self.refcount_bits) - 1
        self.rb_bits = cluster_bits + 3 - refcount_order     # log2 entries per refcount block
        self.rb_entries = 1 << self.rb_bits
        # Compressed cluster descriptor (spec: x = 62 - (cluster_bits - 8)).
        self.csize_shift = 62 - (cluster_bits - 8)
        self.csize_mask = (1 << (cluster_bits - 8)) - 1
        self.cluster_offset_mask = (1 << self.csize_shift) - 1
        slice_bytes = l2_slice_bytes or self.cluster_size
        self.slice_bytes = slice_bytes
        self.slice_entries = slice_bytes // self.l2_entry_bytes
        self.slice_bits = self.slice_entries.bit_length() - 1

    # -- guest offsets ---------------------------------------------------------
    def offset_into_cluster(self, offset):
        return offset & (self.cluster_size - 1)

    def start_of_cluster(self, offset):
        return offset & ~(self.cluster_size - 1)

    def cluster_index(self, offset):
        return offset >> self.cluster_bits

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

    # -- refcounts -------------------------------------------------------------
    def reftable_index(self, cluster):
        return cluster >> self.rb_bits

    def refblock_index(self, cluster):
        return cluster & (self.rb_entries - 1)

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
