# make test: fresh .venv, torch 2.13.0 (CPU) first, then the project with dev + peers extras, then lint + tests.
# make demo: same setup, then the text benchmark suite (experts trained and cached on first use, tuned merges,
#            in- and out-of-domain table, plots) with a representative method set.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/pip install -q -c constraints.txt

.PHONY: setup test lint postgres-server demo demo-merge bench-speed clean

$(STAMP): pyproject.toml setup.py src/neuromerge/kernels/_fused.c constraints.txt requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,peers,bench,search]'
	$(PIP) --no-deps -r requirements-assets.txt
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts

# The distributed-search tests start a throwaway PostgreSQL server on loopback: make sure the server is installed.
postgres-server:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql)

test: setup lint postgres-server
	$(BIN)/python -m pytest

DEMO_METHODS := linear,task_arithmetic,ties,dare_ties,neuromerging

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/neuromerge bench text --methods $(DEMO_METHODS) -o demo/bench-text
	@echo "report: demo/bench-text/results.md (results.json, plots *.png)"

# A merge of small models created on the spot (no training): the engine end to end in seconds.
demo-merge: setup
	$(BIN)/python scripts/make_demo_models.py demo/models
	$(BIN)/neuromerge merge demo/models/neuromerging.yaml -o demo/merged --force
	$(BIN)/python scripts/check_demo.py demo/models demo/merged

bench-speed: setup
	$(BIN)/python benchmarks/merge_speed.py

clean:
	rm -rf $(VENV) demo
