"""The qcow2 format itself: every on-disk structure's layout, parse and pack,
and every constant and kind of the spec (qemu's docs/interop/qcow2.txt).
Nothing here does I/O."""
