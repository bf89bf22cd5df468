# Two entry points for a fresh machine (see README.md):
#   make demo   create .venv, install, run the CPU demo (the main job)
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench lint
setup: $(VENV)/.installed

# torch first and pinned: an unpinned torch (or one pulled in by a dependency) is a multi-GB CUDA build.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[cpu,dev,launch]"
	touch $@

demo: setup
	$(BIN)/python examples/cpu_demo/run_demo.py

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m bench.run_all

lint: setup
	$(BIN)/ruff check rlad_megatron tests tools bench examples
	$(BIN)/ruff format --check rlad_megatron tests tools bench examples
