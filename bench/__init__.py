"""Benchmarks; results and the commands that produced them are in docs/benchmarks.md."""
