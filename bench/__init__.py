"""Benchmarks (``make bench``): each module has a ``run(...) -> dict`` and a ``python -m`` entry."""
