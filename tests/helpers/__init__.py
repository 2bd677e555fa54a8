"""Helpers shared by the test modules: the qemu oracle and qcow2 byte surgery
(qemu_util), the in-process command line (cli_util), NBD clients (nbd_util),
the in-memory reference model (model) and the write scenarios (write_util)."""
