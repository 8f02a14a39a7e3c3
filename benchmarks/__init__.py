"""Benchmarks run by `make bench`: each `bench_*.py` module has `run() -> benchmarks.common.Section`
(Markdown for BENCHMARKS.md plus entries for outputs/bench/bench.json); `benchmarks.gpu` is the GPU suite."""
