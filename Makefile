# Two entry points for a fresh machine (see README): `make simulate` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

.PHONY: setup simulate test lint bench
setup: $(STAMP)

simulate: $(STAMP)
	mkdir -p out
	$(BIN)/jaxpolaron simulate --ensemble --grid 128 --out out/ensemble_5nm.h5 --png out/ensemble_5nm.png --json

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_structure_factor.py
