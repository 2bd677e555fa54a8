"""The image engine: one state object per open image and the subsystems
given that state (mapping, refcounts, cluster allocation and copy-on-write,
subclusters, compressed clusters, snapshots, the backing chain, flush
ordering), around the Cython data path in ``qcow2fast._ext.core``."""
