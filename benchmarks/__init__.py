"""Benchmark scripts (not tests): each records its numbers, with the machine, in benchmarks/RESULTS.md."""
