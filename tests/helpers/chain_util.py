"""Deep backing chains made by qemu, fast: the builder the chain benchmark
and the tests share lives in the package (qcow2fast/benchsuite/chain_util.py)."""

from qcow2fast.benchsuite.chain_util import layer_name, make_deep_chain  # noqa: F401
