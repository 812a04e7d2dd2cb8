# Two commands do everything on a fresh machine with Python 3.11 (see README.md):
#   make demo   set up .venv and run the main job end to end on the embedded defaults
#   make test   set up .venv and run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: demo test test-fast test-slow clean-work setup lock upgrade

setup: $(STAMP)

# The set-up installs exactly uv.lock, never a fresh resolution: on 2026-12-02 a new torchaudio release (2.11.1,
# "torch>=2.11") made a range pin resolve to a wheel whose native library does not load against torch 2.11.0, and
# every fresh install broke. `uv sync --locked` fails (naming the difference) when pyproject.toml and uv.lock
# disagree, and removes whatever in .venv the lock does not hold. uv itself is bootstrapped at the version the
# lock holds (it is a test dependency: the lock-drift test runs it). Upgrading: README "Upgrading dependencies".
# --compile-bytecode: uv writes no .pyc files by default, and where PYTHONDONTWRITEBYTECODE is set (the dev machine,
# many CI images) Python never caches them either, so every process (each Ray worker, each decoder child, each test
# subprocess) compiled ray.data and torch from source again: 1.8 s and 1.6 s of CPU per process. Compiling once here
# (about 30 s) halves the preprocessing job on the 24-video benchmark (benchmarks/RESULTS.md).
UV_VERSION := $(shell awk '/^name = "uv"$$/ {getline; gsub(/[^0-9.]/, ""); print; exit}' uv.lock)

$(BIN)/uv:
	test -n "$(UV_VERSION)" || { echo "uv.lock holds no uv version"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

$(STAMP): pyproject.toml uv.lock Makefile $(BIN)/uv
	UV_PROJECT_ENVIRONMENT=$(VENV) $(BIN)/uv sync --locked --extra test --compile-bytecode --python $(BIN)/python
	touch $(STAMP)

# `make lock`: re-lock after editing pyproject.toml (changes only what the edit needs).
# `make upgrade`: move every package to the newest version pyproject.toml allows (PACKAGE=name for one), install
# it and run every test; then commit uv.lock (README "Upgrading dependencies").
lock: $(BIN)/uv
	$(BIN)/uv lock

upgrade: $(BIN)/uv
	$(BIN)/uv lock $(if $(PACKAGE),--upgrade-package $(PACKAGE),--upgrade)
	$(MAKE) test

demo: $(STAMP)
	$(BIN)/python -m jobs.demo $(ARGS)

# Every test, both tiers (387 tests; 24-41 min on 2 quiet cores, 2026-12-02/03); what CI runs.
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# The fast tier alone (unit + integration on real local Ray, MLflow, moto S3, mp4s; about 2 minutes).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

# The slow end-to-end tier alone: the two-node / local-cluster tests, preprocessing kill-and-resume, the main job
# (about 6 minutes).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(ARGS)

clean-work:
	rm -rf work
