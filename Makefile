# Two commands do everything on a fresh machine with Python 3.11 (see README.md):
#   make demo   set up .venv and run the main job end to end on the embedded defaults
#   make test   set up .venv and run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: demo test test-fast test-slow clean-work setup

setup: $(STAMP)

# uv resolves and installs the pinned dependencies (about 5 GB, mostly torch's CUDA wheels) much faster than pip.
# --compile-bytecode: uv writes no .pyc files by default, and where PYTHONDONTWRITEBYTECODE is set (the dev machine,
# many CI images) Python never caches them either, so every process (each Ray worker, each decoder child, each test
# subprocess) compiled ray.data and torch from source again: 1.8 s and 1.6 s of CPU per process. Compiling once here
# (about 30 s) halves the preprocessing job on the 24-video benchmark (benchmarks/RESULTS.md).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv>=0.5"
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jobs.demo $(ARGS)

# Every test, both tiers (about 8 minutes on 2 cores); what CI runs.
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
