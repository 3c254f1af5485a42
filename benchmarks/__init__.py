"""Benchmarks: aiohttp-wsbus against the bare aiohttp loop and its peers.

Run `python -m benchmarks --help`; benchmarks/README.md explains the workloads.
"""
