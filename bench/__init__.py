"""Benchmarks: each runs n2n and its baseline in one process on the same data and reports ratios."""
