# Set-up is automatic: the first target that needs the environment creates .venv and installs itune into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.itune-installed
export PATH := $(BIN):$(PATH)

.PHONY: env demo test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	bash launcher/demo.sh runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not distributed and not slurm"

clean:
	rm -rf runs .pytest_cache
