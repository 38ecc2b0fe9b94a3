PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint bench clean

install:
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch that this machine carries; a plain `torch` would fetch a CUDA build of several GB.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.13,<3"
	$(BIN)/pip install -q -e ".[dev]"
	# The fused CPU kernels, compiled once here (about a minute) rather than on first use.
	$(BIN)/python -m hmlm.kernels.cpu

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check hmlm tests
	$(BIN)/ruff format --check hmlm tests

bench:
	$(BIN)/hmlm bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
