"""The command line against qemu-img 7.2: same output, JSON and exit statuses."""
