# jobstate — every set-up step lives here, so a fresh machine needs only Python 3.11, make (and Node for buf).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
HOST ?= 127.0.0.1
PORT ?= 50051
PROTOS := $(wildcard protos/jobstate/v1/*.proto)
export PYTHONPATH := $(CURDIR)/server:$(CURDIR)/client:$(CURDIR)/gen

.PHONY: help venv proto proto-check lint test test-fast test-heavy run node-deps etcd-deps clean

help:
	@echo "make run    start the server on $(HOST):$(PORT) (HOST=, PORT= override)"
	@echo "make test   lint, type-check and run every test"
	@echo "make proto  regenerate the Python stubs in gen/ from protos/"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

node-deps: node_modules/.installed

# Stubs are generated, never edited; tests/test_generated.py fails when they are stale.
proto: venv
	bash scripts/gen-proto.sh gen

run: venv
	$(PY) -m jobstate serve --host $(HOST) --port $(PORT) $(ARGS)

lint: venv node-deps
	$(BIN)/ruff check server client tests bench scripts
	$(BIN)/ruff format --check server client tests bench scripts
	$(BIN)/mypy -p jobstate.server -p jobstate.client
	npx --no-install buf lint

# The etcd engine's tests start real etcd servers: Debian's etcd-server (etcd 3.4), installed when missing.
etcd-deps:
	command -v etcd >/dev/null || test -x /usr/bin/etcd || (apt-get -o DPkg::Lock::Timeout=300 update && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y etcd-server)

test: lint etcd-deps
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

test-fast: venv etcd-deps
	$(BIN)/pytest -q -x -m "not slow" $(PYTEST_ARGS)

test-heavy: venv etcd-deps
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

# The benchmark of issue 4: jobstate and etcd side by side (bench/). QUICK=1: small counts, under a minute.
# Installs etcd (Debian's etcd-server) itself when it is missing. BENCH_ARGS: e.g. --uvloop, --profile.
.PHONY: bench
$(VENV)/.bench-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	PYTHONPATH=$(PYTHONPATH):$(CURDIR) $(PY) -m bench $(if $(filter-out 0,$(QUICK)),--quick) $(BENCH_ARGS)

# Issue 13's amplification repro: the server's RSS after one 2 MiB job and 1,000 status updates.
# ARGS: e.g. --store sqlite, --rev COMMIT (measure another commit's server), -- --history-bytes 8MiB.
.PHONY: amplification
amplification: venv etcd-deps
	PYTHONPATH=$(PYTHONPATH):$(CURDIR) $(PY) -m bench.amplification $(ARGS)

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache build *.egg-info
