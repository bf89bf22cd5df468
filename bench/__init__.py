"""Benchmarks and the method comparison. Run each from the repository root as a module,
e.g. `OMP_NUM_THREADS=2 .venv/bin/python -m bench.bench_trainer`; `python -m bench.run_all` runs them all."""
