"""Benchmarks: `make bench` writes ratios against a reference measured in the same run."""
