"""The benchmark suite, installed with the package (``pip install
qcow2fast[bench]``): end-to-end scenarios of qcow2fast run side by side
with QEMU (``qemu-img bench``, ``qemu-img convert``, qemu-nbd) and with the
raw-file limit, in one run.

    qcow2fast bench-suite --quick            # every scenario (suite.py)
    python -m qcow2fast.benchsuite.io_bench --quick

From a clone, ``python -m benchmarks[.NAME]`` runs the same modules
(benchmarks/__init__.py).  They need qemu-img/qemu-io (and for some
scenarios qemu-nbd, nbdinfo/nbdcopy, strace, GNU time) on the PATH.
"""
