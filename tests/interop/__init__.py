"""Interop with qemu 7.2: images qemu writes read bit-exactly, images
qcow2fast writes satisfy qemu, crash safety and repair."""
