from libc.stdint cimport uint64_t, int64_t
from .fileio cimport File
from .cache cimport TableCache
from .hooks cimport DataTransform


cdef class ImageState:
    # The parts of an open image; this object is their one owner.
    cdef readonly object path
    cdef public File file                # the image file: header and metadata
    cdef public File data_file           # where guest data clusters live (the image file;
                                         # an external data file plugs in here)
    cdef public object header            # spec.header.Header, as on disk
    cdef public object geo               # spec.geometry.Geometry
    cdef public TableCache l2_cache
    cdef public TableCache refcount_cache
    cdef public object metadata          # engine.overlap.MetadataMap
    cdef public object snapshot          # the internal snapshot viewed, or None
    cdef readonly DataTransform transform  # applied to all guest data (set_transform), or None
    cdef readonly object debug           # host/blkdebug.Rules of a blkdebug file, or None
    # Every data byte goes through read_data/write_data (a transform, or a
    # blkdebug file whose events they announce): the C paths do not skip them.
    cdef readonly bint funnel
    cdef readonly bint external_data     # data_file is an external data file (set_data_file)

    # The geometry the data path needs, from ``geo``.
    cdef readonly int cluster_bits
    cdef readonly int64_t cluster_size
    cdef readonly int l2_bits            # log2 L2 entries per table
    cdef readonly int slice_bits         # log2 L2 entries per cached slice
    cdef readonly int64_t slice_bytes    # bytes of one cached slice
    cdef readonly int slice_unit_bits    # log2 allocation units per cached slice
    cdef readonly bint extended          # extended L2 entries (subclusters)
    cdef readonly int unit_bits          # allocation unit: subcluster or cluster
    cdef readonly int64_t size           # the guest disk's size: set_size() is its one writer

    # Modes.
    cdef readonly object cache_mode
    cdef public bint read_only
    cdef public object read_only_why     # why writes are refused, beyond mode "r"
    cdef public bint writethrough        # every write stable before it returns
    cdef public bint unsafe              # flush and close never sync
    cdef public bint lazy_refcounts
    cdef public bint alloc_fast          # allocating writes may run in C
    cdef public bint closed

    # Host space.  Invariants: every host byte at or past zero_from reads as
    # zero; alloc_end is the end of every cluster handed out; host_limit is
    # the end of the host range any L2 entry may point into; the file's size
    # up to durable_end was made stable by grow_durable (0: not yet), so host
    # bytes in [zero_from, durable_end) read as zero whatever a power loss
    # keeps; grown_from is the file's size before grow_durable first grew it
    # (-1: never), what close trims back to.
    cdef public int64_t zero_from
    cdef public int64_t alloc_end
    cdef public int64_t host_limit
    cdef public int64_t durable_end
    cdef public int64_t grown_from

    # C views of the active L1 table and of the metadata bitmap (the arrays
    # are kept alive here; both change only under the exclusive lock).
    cdef object _l1
    cdef object _meta
    cdef uint64_t *l1
    cdef int64_t l1_size
    cdef const unsigned char *meta_bits
    cdef int64_t meta_clusters

    cdef bint touches_metadata(self, uint64_t host, int64_t n) noexcept nogil
    # ``guest``: the guest offset of buf's first byte (the transform's IVs may
    # derive from it); ``host`` and ``guest`` agree modulo the cluster size.
    cdef int read_data(self, char *buf, int64_t n, uint64_t host, uint64_t guest) except -1
    cdef int write_data(self, const char *buf, int64_t n, uint64_t host,
                        uint64_t guest) except -1
    cdef bint transform_aligned(self, int64_t n, uint64_t host) noexcept nogil
