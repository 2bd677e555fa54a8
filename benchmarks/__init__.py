"""End-to-end benchmarks of qcow2fast, run side by side with QEMU's own
driver (``qemu-img bench``) and with the raw-file limit, in one run.

Run them as modules from the repository root, e.g.::

    python -m benchmarks.io_bench --quick
"""
