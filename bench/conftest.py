"""Benchmark suite: ``pytest bench --benchmark-only``. Each benchmark checks its backend against the reference first."""
