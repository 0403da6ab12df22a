# gradflow-sweeps: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The pinned torch build is installed first, so the project's `torch>=` range adds nothing. Here that is the
# CPU wheel on disk; on a GPU machine the same pin from PyPI is a CUDA build (or set TORCH_SPEC).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast ui bench up down clean sweep sweep-status sweep-report sweep-requeue \
	dashboard readme-images
SWEEP_WORKERS ?= 2
SWEEP_STORAGE ?=
# a preset's study (ARGS=experiment=<name>) runs its own points; otherwise the activation x init x depth grid
SWEEP_ARGS = hparams_search=$(if $(findstring experiment=,$(ARGS)),preset,grid) $(ARGS)
export GRADFLOW_SWEEP_STORAGE := $(or $(SWEEP_STORAGE),$(GRADFLOW_SWEEP_STORAGE))

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install the project (skipped when pyproject.toml is unchanged)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

train: install ## one training run on the default config into mlflow.db (ARGS="activation=relu init=he")
	$(PY) -m src.train $(ARGS)

test: install ## the whole test suite (PYTEST_ARGS="-m 'not slow'" for the quick tiers)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install ## the test suite without the slow subprocess tiers
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

ui: install ## the MLflow UI on mlflow.db (or $MLFLOW_TRACKING_URI), opened on the runs table
	$(PY) -m src.tracking.ui $(ARGS)

readme-images: install ## README screenshots from a real 2x2 multirun into docs/img (~2 min; ARGS=--quick: 3 epochs)
	$(PY) scripts/readme_images.py $(ARGS)

bench: install ## per-step overhead of the statistics vs stats=off and vs Lightning's own logging (~6 min)
	$(PY) benchmarks/overhead.py $(ARGS)

sweep: install ## the activation x init x depth grid with SWEEP_WORKERS local workers (SWEEP_STORAGE=postgresql://...)
	$(PY) -m src.train -m $(SWEEP_ARGS) hydra.sweeper.workers=$(SWEEP_WORKERS)

sweep-status: install ## progress of the sweep's study (same SWEEP_STORAGE / ARGS as make sweep)
	$(PY) -m src.sweeps status $(SWEEP_ARGS)

sweep-report: install ## (re)write the sweep report and attach it to the study's MLflow parent run
	$(PY) -m src.sweeps report $(SWEEP_ARGS)

sweep-requeue: install ## queue the points that failed in every trial again (then make sweep runs them)
	$(PY) -m src.sweeps requeue $(SWEEP_ARGS)

dashboard: install ## optuna-dashboard on the sweep's storage (DASHBOARD_PORT, default 8080)
	$(PY) -m src.sweeps dashboard $(SWEEP_ARGS)

WORKERS ?= 0
COMPOSE := docker compose
up: ## start PostgreSQL, MLflow and optuna-dashboard with docker compose (WORKERS=4: also 4 sweep workers)
	@command -v docker >/dev/null || { echo "make up: docker is not installed; install Docker Engine with the compose plugin (https://docs.docker.com/engine/install/)" >&2; exit 1; }
	@$(COMPOSE) version >/dev/null 2>&1 || { echo "make up: 'docker compose' is missing; install the Docker Compose v2 plugin" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make up: no Docker engine answers (is the daemon running, may this user use it?)" >&2; exit 1; }
	@test -f .env || { echo "make up: no .env; cp .env.example .env and set its passwords" >&2; exit 1; }
	@! grep -q '=change-me' .env || { echo "make up: .env still has change-me values; set real passwords first" >&2; exit 1; }
	$(COMPOSE) up -d --build --wait postgres mlflow optuna-dashboard
	@if [ "$(WORKERS)" != 0 ]; then $(COMPOSE) up -d --no-deps --scale worker=$(WORKERS) worker; fi

down: ## stop the compose stack (data volumes are kept; `docker compose down -v` deletes them)
	@command -v docker >/dev/null || { echo "make down: docker is not installed" >&2; exit 1; }
	$(COMPOSE) down

clean: ## remove outputs of runs (keeps mlflow.db and .venv)
	rm -rf outputs multirun
