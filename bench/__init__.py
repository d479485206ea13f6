"""Benchmarks (`make bench`): each figure is printed next to a reference from the same run."""
