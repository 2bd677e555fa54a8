"""The Image API: reads, writes, allocation, subclusters, compressed writes,
threads, write ordering, property tests against the model, bad input, block
devices."""
