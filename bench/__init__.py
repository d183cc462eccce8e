"""Benchmarks: `make bench` (or `python -m bench [case ...] [--quick]`)."""
