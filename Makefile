# One entry point: `make demo` (set up + offline demo sweep + report), `make test` (set up + suite).
# Targets are idempotent: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast lint demo report ui clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel that lies on disk; a bare `torch` pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[demo,dev]'
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .
	# Dockerfile (hadolint), compose file and KubeRay manifest: static checks, no engine needed
	PYTHON=$(BIN)/python bash docker/check.sh

test: setup lint
	$(BIN)/pytest -q --durations=10

# Everything but the end-to-end sweeps and fault injections (marked `slow`): for quick edits.
test-fast: setup
	$(BIN)/pytest -q -m "not slow" --durations=10

demo: setup
	$(BIN)/ikd-sweep run sweeps/demo.yaml
	$(BIN)/ikd-sweep report --sweep demo --format all

ui: setup
	$(BIN)/ikd-sweep ui

clean:
	rm -rf $(VENV) ikd-runs .pytest_cache .ruff_cache
