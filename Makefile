# Two commands do everything on a fresh machine:
#   make repro   set up (venv, pinned deps, embedded data) and run the DVC pipeline
#   make test    set up and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1

.PHONY: setup data repro test test-fast lint ui bench clean deploy mlflow-server system-deps

setup: $(VENV)/.installed data

# Reinstall only when a requirements file changes.
$(VENV)/.installed: requirements.txt serving/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	@# The project itself, editable: its packages import from the checkout, its console scripts
	@# (vi-score-folder, vi-local-server, vi-release ...) land in .venv/bin. Pins come from above.
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	@# OpenVINO (benchmarks only) reads its telemetry consent from this file; 0 = opted out.
	@# It has no environment-variable switch, and importing it without the file opts in.
	mkdir -p $(HOME)/intel && [ -f $(HOME)/intel/openvino_telemetry ] || echo 0 > $(HOME)/intel/openvino_telemetry
	touch $@

# Materialise the embedded default data (ELPV, CC BY-NC-SA 4.0) and check it against data.dvc.
data: $(VENV)/.installed
	$(BIN)/python -m experiments.make_data

repro: setup
	$(BIN)/dvc repro

# Two xdist workers: the tests on the team MLflow server and the shared small pipeline run (trained
# once per session) stay in one worker, everything else runs beside them (tests/conftest.py).
PYTEST_WORKERS ?= -n 2 --dist loadgroup
test: setup system-deps
	$(BIN)/python -m pytest $(PYTEST_WORKERS)

# The unit tests only (minutes -> under two): no training beyond the tiny serving model, no dvc
# runs, no PostgreSQL/MLflow server, no Chromium. `make test` still runs everything.
test-fast: setup
	$(BIN)/python -m pytest $(PYTEST_WORKERS) -m "not slow"

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

# MLflow UI on http://127.0.0.1:5000 over the pipeline's tracking store (config/tracking_uri.py decides).
ui: $(VENV)/.installed
	$(BIN)/mlflow ui --backend-store-uri "$$($(BIN)/python -m config.tracking_uri)" --host 127.0.0.1 --port 5000

# Team tracking server: PostgreSQL backend store + S3 artifacts (proxied); see tools/mlflow_server.py.
# MLFLOW_SERVER_ARGS='--artifacts-destination s3://bucket/mlflow' for real S3 (default: local moto S3).
MLFLOW_SERVER_ARGS ?= --local-s3
mlflow-server: $(VENV)/.installed system-deps
	$(BIN)/python -m tools.mlflow_server $(MLFLOW_SERVER_ARGS)

# Debian packages the team-scale tests need: PostgreSQL (MLflow backend store) and Chromium (UI
# check). Idempotent: skipped when present; needs root (CI and the dev machines run as root).
SYSTEM_PKGS := postgresql chromium
system-deps:
	@missing=$$(for p in $(SYSTEM_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" != 0 ]; then \
	  echo "warning: missing Debian packages: $$missing (run 'sudo make system-deps'); their tests skip"; \
	elif [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

bench: setup
	$(BIN)/python -m benchmarks.pipeline
	$(BIN)/python -m benchmarks.serving

# Release the promoted model and deploy a stage: checks → docker build/push to ECR → CloudFormation.
# The change set (added/modified/replaced resources, IAM changes) is shown and confirmed on the
# terminal; YES=1 executes unasked (CI); ALLOW_REPLACE=1 lets it replace the results table or bucket.
#   make deploy [STAGE=prod] [DRY_RUN=1] [YES=1] [ALLOW_REPLACE=1] [CONTEXT="memory_mb=4096 retention_days=30"]
STAGE ?= dev
deploy: $(VENV)/.installed
	$(BIN)/python -m release.publish --stage $(STAGE) $(if $(DRY_RUN),--dry-run) $(if $(YES),--yes) \
	  $(if $(ALLOW_REPLACE),--allow-replace) $(foreach c,$(CONTEXT),--context $(c))

clean:
	rm -rf build mlartifacts mlflow.db
