"""Benchmarks of spin-ray against plain baselines; run from the repository root as modules,
e.g. ``python -m bench.generation --size tiny``. Each prints a table and ends with one JSON line.
See docs/PERFORMANCE.md."""
