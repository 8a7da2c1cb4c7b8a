"""Benchmarks (not tests): run them as modules, e.g. `python -m bench.engine_bench`."""
