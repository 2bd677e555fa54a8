"""Benchmark suite smoke tests."""
