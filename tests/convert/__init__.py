"""qcow2fast convert: round trips, compression, streams and errors."""
