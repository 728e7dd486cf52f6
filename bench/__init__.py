"""Benchmark of fusedwd against torch.optim.AdamW and the memory-traffic floor.

Run ``python -m bench.run --help``; docs/benchmarks.md explains the columns.
"""
