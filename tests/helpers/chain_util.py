"""Deep backing chains made by qemu, fast: the builder the chain benchmark
and the tests share lives in the package (qcow2fast/benchsuite/chain_util.py)."""

from qcow2fast.benchsuite.chain_util import layer_name, make_deep_chain  # noqa: F401

# Layer variants of a mixed chain ((extra -o options, compressed)): cluster
# sizes 512 B to 2 MiB, extended L2, compressed and v2 layers.
MIXED = (("", False), ("cluster_size=4096", False), ("extended_l2=on", False), ("", True),
         ("compat=0.10", False), ("cluster_size=2097152", False), ("cluster_size=512", False),
         ("cluster_size=32768,extended_l2=on", False))
