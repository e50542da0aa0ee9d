# The two set-up commands of the README:
#   make demo   - create .venv, install bz, train the digits example
#   make check  - create/update .venv, run ruff, mypy --strict and pytest
#
# torch is installed first, pinned, so that pip does not pull a multi-GB CUDA build
# when a CPU build is at hand. Choose another build with e.g. `make TORCH="torch==2.5.1"`.
# pip byte-compiles what it installs (about a minute of CPU). Not `--no-compile`: where
# PYTHONDONTWRITEBYTECODE is set (CI machines often set it) Python then never writes
# the .pyc files, and every process compiles torch from source again (the suite took
# 1841 s instead of about 1000 that way).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
# Test processes (pytest-xdist), a test file each: most slow tests wait on subprocesses,
# so two share two cores well. `make check JOBS=0` runs the tests in one process.
JOBS   ?= 2
PIP    := $(BIN)/python -m pip install --quiet
PYTEST := $(BIN)/pytest $(if $(filter 0,$(JOBS)),,-n $(JOBS) --dist loadfile)
BESIDE := $(if $(filter 0,$(JOBS)),,-j 2)

.PHONY: demo check quick lint typecheck test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files make repeated runs cheap; they are redone when pyproject.toml changes.
$(VENV)/.torch: | $(BIN)/python
	$(PIP) "$(TORCH)"
	touch $@

$(VENV)/.examples: pyproject.toml $(VENV)/.torch
	$(PIP) -e ".[examples]"
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PIP) -e ".[dev]"
	touch $@ $(VENV)/.examples

demo: $(VENV)/.examples
	cd examples/digits && ../../$(BIN)/bz train --no-resume

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev
	$(BIN)/mypy

# The project's own modules are byte-compiled first (a second): pip compiles what it
# installs but not an editable install's source, and where PYTHONDONTWRITEBYTECODE is set
# Python never writes the .pyc, so every `bz` process a test starts compiled bz and the
# tests' helpers from source again (~0.25 CPU s a supervised `bz train`).
test: $(VENV)/.dev
	$(BIN)/python -m compileall -q src tests
	$(PYTEST) $(if $(QUICK),-m "not slow" --hypothesis-profile=quick)

# ruff first (a second: a style error stops at once), then mypy beside the tests: mypy
# works on one core for about 100 CPU s from a cold cache, which in series left the
# other core idle for as long (`make check JOBS=0` keeps everything in series).
check: lint
	$(MAKE) --no-print-directory $(BESIDE) typecheck test

# The quick part: lint, types and the tests not marked slow (about a minute of tests),
# each property test on a fifth of its examples (the `quick` profile of tests/conftest.py).
# mypy beside the tests here too.
quick: lint
	$(MAKE) --no-print-directory $(BESIDE) typecheck test QUICK=1

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/startup.py
	$(BIN)/python benchmarks/distributed.py
	$(BIN)/python benchmarks/checkpoint_io.py
	$(BIN)/python benchmarks/resume.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
