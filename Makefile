PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint bench clean gpu-data gpu-check

install:
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch that this machine carries; a plain `torch` would fetch a CUDA build of several GB.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.13,<3"
	$(BIN)/pip install -q -e ".[dev]"
	# The fused CPU kernels, compiled once here (about a minute) rather than on first use.
	$(BIN)/python -m hmlm.fast.kernels.cpu

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check hmlm tests tools
	$(BIN)/ruff format --check hmlm tests tools

bench:
	$(BIN)/hmlm bench

# make gpu-check needs the enwik8 prefix of ../shared/data prepared into an ignored folder, which travels to the
# GPU machine (../shared does not): run `make gpu-data` here first, and carry gpu-data/.
SHARED_DATA ?= ../shared/data
GPU_DATA ?= gpu-data
DATA_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-data:
	src=$$(mktemp -d) && cp $(SHARED_DATA)/enwik8/enwik8.head $$src/enwik8 && \
	PYTHONPATH=. $(DATA_PY) -m hmlm data enwik8 --source $$src --no-verify --force --data-dir $(GPU_DATA); \
	status=$$?; rm -rf $$src; exit $$status

# On a GPU machine, from the checkout, with that machine's own torch (no install, no network); at most 8 minutes.
# One report: $$OUT/gpu_check.md (default gpu-check-out/).
GPU_PY ?= python3
gpu-check:
	PYTHONPATH=. $(GPU_PY) tools/gpu_check.py --data-dir $(GPU_DATA)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
