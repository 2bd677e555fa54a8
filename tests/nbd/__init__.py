"""The NBD server: real clients, and a raw client for the protocol corners."""
