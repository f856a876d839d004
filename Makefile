# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

.PHONY: setup demo simulate test lint bench
setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/jaxpolaron demo --out out/demo

simulate: $(STAMP)
	mkdir -p out
	$(BIN)/jaxpolaron simulate --ensemble --grid 128 --out out/ensemble_5nm.h5 --png out/ensemble_5nm.png --json

# Two worker processes, each test file in one of them (module fixtures are built once).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_structure_factor.py

# OM (ondamonitor) in its own environment (it needs numpy<2): the peakfinder8 reference of
# benchmarks/bench_peakfinder.py --ondamonitor (benchmarks/om_reference.py).
OM_VENV := .venv-om

.PHONY: om-venv
om-venv: $(OM_VENV)/.installed

$(OM_VENV)/.installed:
	$(PYTHON) -m venv $(OM_VENV)
	$(OM_VENV)/bin/pip install --quiet --upgrade pip
	$(OM_VENV)/bin/pip install --quiet "numpy<2" ondamonitor==23.8.3
	touch $@
