# lambdarec — run `make help` for the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Serving processes: one BLAS/OpenMP thread each (see STACK.md: threads fight on 2 cores).
export OPENBLAS_NUM_THREADS ?= 1
export PYTHONHASHSEED ?= 0
DATA ?=
RETRAIN ?=
REPLICAS ?= 1

.PHONY: help setup java run test test-all test-slow test-reliability lint protos pipeline bench airflow sql tables clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

# One line per phase (pip's own output is hundreds of lines, -q is silent for minutes);
# pip's errors still reach stderr in full.
$(STAMP): pyproject.toml clients/python/pyproject.toml
	@echo "[setup 1/4] system packages: Java >= 17, OpenMP, BLAS, Chromium (apt when root)"
	@$(MAKE) --no-print-directory java
	@echo "[setup 2/4] virtualenv $(VENV) from $(PYTHON_BOOT)"
	@$(PYTHON_BOOT) -m venv $(VENV)
	@echo "[setup 3/4] upgrading pip"
	@$(PY) -m pip install -q --upgrade pip
	@echo "[setup 4/4] installing lambdarec-client and lambdarec with dev tools (~2 min on a cold cache)"
	@$(PY) -m pip install -e ./clients/python -e '.[dev]' | awk \
		'/^Collecting/ { if (++n % 25 == 0) { print "  " n " packages resolved..."; fflush() } } \
		 /^Installing collected/ { print "  installing " n " packages..."; fflush() } \
		 /^Successfully installed/ { print "  installed" }'; exit $${PIPESTATUS[0]}
	@touch $(STAMP)
	@echo "[setup] done: $(VENV)"

setup: $(STAMP) protos ## Create the venv and install everything (idempotent)

java: ## Check system packages: Java >= 17, OpenMP, native BLAS (apt-installs them when root)
	@bash infra/scripts/ensure_system.sh

protos: $(STAMP) ## Generate gRPC code + .pyi stubs from protos/ into clients/python/lambdarec/
	@$(PY) clients/python/protogen.py --if-stale

run: setup ## Bring the system up (lake, sample model, gRPC server); REPLICAS=N: N behind HAProxy
	$(PY) -m online.run --replicas $(REPLICAS)

test: setup ## Run the test suite (fast + slow, no GPU, no reliability soak)
	$(PY) -m pytest -m "not gpu and not reliability and not integration" -q

test-integration: setup ## Tests that start external processes (Spark cluster, Airflow standalone)
	$(PY) -m pytest -m "integration" -q

test-reliability: setup ## Crash / reload-under-load / fuzz suites
	$(PY) -m pytest -m "reliability" -q

test-gpu: setup ## GPU checks: implicit on CUDA, FAISS / PyTorch GPU search (skipped without CUDA)
	$(PY) -m pytest -m "gpu" -q

lint: setup ## ruff + mypy
	$(PY) -m ruff check lake spark_jobs online dags tests bench clients/python
	$(PY) -m mypy lake spark_jobs online clients/python/lambdarec_client

pipeline: setup ## Run the batch pipeline end to end (DATA=synthetic|ml-100k|ml-1m, RETRAIN=1)
	$(PY) -m spark_jobs.pipeline $(if $(DATA),--data $(DATA),) $(if $(RETRAIN),--retrain,)

bench: setup ## Benchmarks: writes bench/results/<timestamp>/report.md
	$(PY) -m bench.run

airflow: setup ## Start Airflow standalone with this project's DAGs (PORT=8080; Ctrl-C stops it)
	$(PY) -m infra.airflow_standalone $(if $(PORT),--port $(PORT),)

sql: setup ## Run SQL over the lake: make sql Q="SELECT count(*) FROM bronze_events"
	$(PY) -m lake.sql "$(Q)"

tables: setup ## List lake tables with versions and row counts
	$(PY) -m lake.sql --tables

clean: ## Remove the local lake, models, WAL and Airflow home (keeps the venv)
	rm -rf var
