# The two set-up commands of the README, and the rest of the project's chores.
VENV ?= .venv
BIN := $(VENV)/bin
# Two test processes, each taking whole files in collection order (tests/conftest.py: LONGEST_FIRST). A test process
# that dies ends the run at once, naming its test: xdist's file scheduler would otherwise wait forever for its files.
PYTEST := $(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --max-worker-restart=0
export NO_ALBUMENTATIONS_UPDATE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1

.PHONY: quickstart test test-fast lint install ui clean

# A virtual environment with torch (CPU/CUDA wheel from pip) and cnnlab in editable mode.
$(BIN)/cnnlab: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[dev,openvino]"
	touch $@

install: $(BIN)/cnnlab

# Train the quick-start recipe on the built-in digits, tracked in mlruns/; prints test accuracy and the UI command.
quickstart: install
	$(BIN)/cnnlab fit --config recipes/quickstart.yaml

# The whole test suite (what .ci/run runs), two test processes at once (a torch thread each). It first starts
# PostgreSQL, an MLflow server and Chromium (.ci/services; installing them needs root); without them their
# tests are skipped, except in CI. Afterwards it stops what it started and leaves alone what was already running.
test: install
	bash -c 'if bash .ci/services; then source /tmp/cnnlab-services/env; \
	  else echo "services not started: their tests are skipped"; fi; \
	  $(PYTEST); code=$$?; bash .ci/services stop; exit $$code'

# The tests not marked slow: every module's unit tests, no fit, no server, no study; the loop while working.
test-fast: install
	$(PYTEST) -m "not slow"

# ruff (lint and format) and the import-linter contract of the layers (pyproject.toml); CI runs it before the
# tests. platform/cnnlab/callbacks links to callbacks/, so tools that read the package from its folder see
# cnnlab.callbacks where it is installed.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

ui: install
	$(BIN)/cnnlab ui

clean:
	rm -rf mlruns/*.db mlruns/[0-9]* build *.egg-info
