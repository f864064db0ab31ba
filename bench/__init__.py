"""Benchmarks of the gateway's real code paths against raw library baselines.

``python -m bench`` (full) or ``python -m bench --quick`` (CI, under a minute). Each scenario
module has one ``run(size: Size) -> Result``; the runner repeats it, keeps the median of every
figure, prints a table and writes ``bench/RESULTS.md``.
"""
