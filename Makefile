# jobstate — every set-up step lives here, so a fresh machine needs only Python 3.11, make (and Node for buf).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
HOST ?= 127.0.0.1
PORT ?= 50051
# The HTTP listener (Connect, gRPC-Web, JSON and the dashboard) of `make run`; HTTP_PORT= (empty) turns it off.
HTTP_PORT ?= 8080
PROTOS := $(wildcard protos/jobstate/v1/*.proto)
export PYTHONPATH := $(CURDIR)/server:$(CURDIR)/client:$(CURDIR)/gen

.PHONY: help venv proto proto-check lint test test-fast test-heavy run node-deps etcd-deps chromium-deps docs-deps web screenshots clean soak

help:
	@echo "make run    start the server on $(HOST):$(PORT), HTTP and the dashboard on http://$(HOST):$(HTTP_PORT)"
	@echo "            (HOST=, PORT=, HTTP_PORT= override)"
	@echo "make test   lint, type-check and run every test"
	@echo "make proto  regenerate the Python stubs in gen/ and the TypeScript ones in web/gen/ from protos/"
	@echo "make web    rebuild the dashboard's bundle (web/ -> server/jobstate/server/static/)"

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
proto: venv node-deps
	bash scripts/gen-proto.sh gen .
	$(MAKE) --no-print-directory web

# The dashboard (web/): type-checked, then bundled by esbuild into server/jobstate/server/static/, which is
# committed so that pip install needs no Node; tests/test_web_bundle.py fails when it is stale.
web: node-deps
	npx --no-install tsc -p web
	node web/build.mjs

run: venv
	$(PY) -m jobstate serve --host $(HOST) --port $(PORT) $(if $(HTTP_PORT),--http-port $(HTTP_PORT)) $(ARGS)

lint: venv node-deps
	$(BIN)/ruff check server client tests bench scripts
	$(BIN)/ruff format --check server client tests bench scripts
	$(BIN)/mypy -p jobstate.server -p jobstate.client
	npx --no-install buf lint
	npx --no-install tsc -p web
	@# The .proto files are a public contract: additive changes only, checked against the previous commit.
	if git rev-parse -q --verify HEAD~1 >/dev/null; then npx --no-install buf breaking --against '.git#ref=HEAD~1'; \
	else echo "buf breaking: no previous commit to compare with (shallow clone)"; fi

# The etcd engine's tests start real etcd servers: Debian's etcd-server (etcd 3.4), installed when missing.
etcd-deps:
	command -v etcd >/dev/null || test -x /usr/bin/etcd || (apt-get -o DPkg::Lock::Timeout=300 update && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y etcd-server)

# The dashboard's browser tests (tests/browser/) drive Debian's chromium through Playwright, which cannot
# download browsers of its own here: installed when missing.
chromium-deps:
	test -x /usr/bin/chromium || (apt-get -o DPkg::Lock::Timeout=300 update && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y chromium)

# The docs' examples (tests/docs/test_snippets.py) run curl and jq as a reader would: installed when missing.
docs-deps:
	command -v curl >/dev/null && command -v jq >/dev/null || (apt-get -o DPkg::Lock::Timeout=300 update && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y curl jq)

# The dashboard's pictures in docs/ (the README shows docs/dashboard.png), taken by the browser tests.
screenshots: venv node-deps chromium-deps
	JOBSTATE_SCREENSHOTS=docs $(BIN)/pytest -q -p no:cacheprovider tests/browser -k "screenshots or token_protected"

test: lint etcd-deps chromium-deps docs-deps
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

test-fast: venv etcd-deps chromium-deps docs-deps
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
	PYTHONPATH=$(PYTHONPATH):$(CURDIR) $(PY) -m bench.vs_http $(if $(filter-out 0,$(QUICK)),--quick --runs 1)

# Only the HTTP-next-to-gRPC rows (bench/http.py): three runs on fresh servers, median and spread.
.PHONY: bench-http
bench-http: $(VENV)/.bench-installed
	PYTHONPATH=$(PYTHONPATH):$(CURDIR) $(PY) -m bench.vs_http $(if $(filter-out 0,$(QUICK)),--quick --runs 1) $(BENCH_HTTP_ARGS)

# The soak of issue 9: the demo workload for SOAK_SECONDS (default 600) on each of SOAK_ENGINES, retention on
# and off side by side; writes bench/results/soak.{md,png} and soak-<engine>.csv and prints the flat-memory
# verdict (exit 1 when it fails). SOAK_ARGS: more options (python -m bench.soak --help).
.PHONY: soak
SOAK_SECONDS ?= 600
SOAK_ENGINES ?= memory,sqlite
soak: $(VENV)/.bench-installed
	PYTHONPATH=$(PYTHONPATH):$(CURDIR) $(PY) -m bench.soak --engines $(SOAK_ENGINES) --duration $(SOAK_SECONDS) $(SOAK_ARGS)

# Issue 13's amplification repro: the server's RSS after one 2 MiB job and 1,000 status updates.
# ARGS: e.g. --store sqlite, --rev COMMIT (measure another commit's server), -- --history-bytes 8MiB.
.PHONY: amplification
amplification: venv etcd-deps
	PYTHONPATH=$(PYTHONPATH):$(CURDIR) $(PY) -m bench.amplification $(ARGS)

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache build *.egg-info
