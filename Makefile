# The two README commands: `make demo` (the main job on the built-in sample data) and
# `make test` (the full suite CI runs, with coverage). `make test-fast` skips the slow
# end-to-end tests for the edit loop. `make lint` runs the static checks, configured in
# pyproject.toml: the import layers (lint-imports), ruff (lint and import order, then
# format), mypy; both test targets run it first. `make ci` runs CI's script here. Each sets
# up everything it needs on a fresh machine: a virtual environment in .venv with the project
# and its dependencies installed.
#
# TORCH picks the torch build. The default pin takes the CPU wheel where one is on disk (CI);
# a GPU user can keep their own: `make test TORCH=torch` or TORCH="" to skip installing it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO ?= demo
# The suite runs in pytest-xdist worker processes, whole modules each (a module's fixtures are
# built once), the end-to-end modules first (tests/conftest.py). Most of their time is waiting
# on Ray, servers and subprocesses, so more workers than cores pays; TEST_WORKERS=0 runs in one
# process.
TEST_WORKERS ?= 4
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder)
# Line coverage of the four packages, measured in the test processes (code that runs in the
# subprocesses the tests start, Ray workers and uvicorn servers among them, is not counted);
# COV="" turns it off.
COV ?= --cov=pipeline --cov=trainer --cov=serving --cov=deploy --cov-report=term:skip-covered

# `make test-gpu`: every test marked `gpu` (make test skips them where there is no CUDA device,
# never fakes them), in one command, on a machine with a GPU; where there is none it says so
# and fails. GPU_PYTHON is the interpreter: by default the project's .venv; on a bare GPU
# machine its own python with the wheels docs/benchmarks.md lists (`make test-gpu
# GPU_PYTHON=python3`, no install step). Only the modules that hold `gpu` tests are collected.
GPU_PYTHON ?= $(PY)
GPU_TESTS = $(shell grep -rlE "mark\.gpu" tests --include='test_*.py' | sort)

.PHONY: demo test test-fast test-gpu lint ci install clean-demo

$(VENV)/.installed: pyproject.toml
	@echo "== setting up $(VENV) (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(PY) -m pip install --quiet "$(TORCH)")
	$(PY) -m pip install --quiet -e '.[all]'
	@touch $@

install: $(VENV)/.installed

lint: $(VENV)/.installed
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(XDIST) $(COV) --durations=15

test-fast: lint
	$(PY) -m pytest $(XDIST) -m "not slow"

test-gpu: $(if $(filter $(PY),$(GPU_PYTHON)),$(VENV)/.installed)
	@$(GPU_PYTHON) -c "import sys, torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; \
		print(f'make test-gpu: {n} CUDA device(s), torch {torch.__version__}'); sys.exit(0 if n else 1)" || \
		{ echo "make test-gpu: no CUDA GPU here: the gpu tests need one (make test skips them; nothing is faked)" >&2; exit 1; }
	$(GPU_PYTHON) -m pytest -m gpu -p no:cacheprovider $(GPU_TESTS)

# What CI runs, as CI runs it (a fresh install aside: it reuses .venv if there is one).
ci:
	CI=true bash .ci/run

demo: $(VENV)/.installed
	$(PY) -m deploy.demo --out $(DEMO)

clean-demo:
	rm -rf $(DEMO)
