"""Benchmarks (`make bench`): every figure is printed next to a reference measured in the same run."""
