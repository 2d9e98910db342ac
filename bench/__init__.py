"""Benchmarks (`make bench` -> docs/benchmarks.md): each figure is a ratio against its anchor in the
same run. May import anything in the project."""
