"""Fleet operations: convert_many / check_many and qcow2fast fleet."""
