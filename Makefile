# Two commands do all set-up on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# DVC stages run `python ...`: put the project's environment first on PATH for them.
export PATH := $(BIN):$(PATH)

.PHONY: run test data lint format clean

run: $(VENV)/installed data  ## install, materialise data/, run the whole pipeline
	dvc repro

test: $(VENV)/installed  ## install and run the test suite, on every core, printing the 15 slowest tests
	pytest -n auto --dist loadgroup --durations=15

data: $(VENV)/installed  ## data/ from a DVC remote, else the embedded sample (no network needed)
	inatpipe data setup

lint: $(VENV)/installed
	ruff check . && ruff format --check .

format: $(VENV)/installed
	ruff format . && ruff check --fix .

$(VENV)/installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

clean:  ## remove the environment (data/, models and the DVC cache stay)
	rm -rf $(VENV)
