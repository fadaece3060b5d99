"""Benchmarks behind ``python -m isal_backend bench``: the active-learning loop (``al``) and its report."""
