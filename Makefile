# make test: fresh .venv, torch 2.13.0 (CPU) first, then the project with dev + peers extras, then lint + tests.
# make demo: same setup, then a real merge of small models this Makefile creates.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/pip install -q -c constraints.txt

.PHONY: setup test lint demo bench-speed clean

$(STAMP): pyproject.toml constraints.txt requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,peers,bench]'
	$(PIP) --no-deps -r requirements-assets.txt
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts

test: setup lint
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/python scripts/make_demo_models.py demo/models
	$(BIN)/neuromerge merge demo/models/neuromerging.yaml -o demo/merged --force
	$(BIN)/python scripts/check_demo.py demo/models demo/merged

bench-speed: setup
	$(BIN)/python benchmarks/merge_speed.py

clean:
	rm -rf $(VENV) demo
