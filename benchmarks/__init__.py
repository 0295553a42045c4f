"""Benchmarks: `python benchmarks/throughput.py` (see its docstring)."""
