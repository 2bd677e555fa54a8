"""Checking and repairing images (qemu's qcow2_check_refcounts): the
references every cluster should have, ``check`` and its ``-r`` repairs, and
the refcount rebuild."""
