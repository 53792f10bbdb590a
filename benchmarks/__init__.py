"""Benchmarks (run as scripts or `python -m benchmarks.X`)."""
