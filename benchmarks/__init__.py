"""Mesh for Python's benchmarks: ``python -m benchmarks --help``."""
