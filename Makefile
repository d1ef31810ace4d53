# The two README commands: `make demo` (the main job on the built-in sample data) and
# `make test` (the full suite CI runs). `make test-fast` skips the slow end-to-end tests for
# the edit loop; `make lint` checks the import layers (pyproject's [tool.importlinter]). Each sets up everything it needs on a fresh machine: a virtual environment in
# .venv with the project and its dependencies installed.
#
# TORCH picks the torch build. The default pin takes the CPU wheel where one is on disk (CI);
# a GPU user can keep their own: `make test TORCH=torch` or TORCH="" to skip installing it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO ?= demo

.PHONY: demo test test-fast lint install clean-demo

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

test: lint
	$(PY) -m pytest

test-fast: lint
	$(PY) -m pytest -m "not slow"

demo: $(VENV)/.installed
	$(PY) -m deploy.demo --out $(DEMO)

clean-demo:
	rm -rf $(DEMO)
