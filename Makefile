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

.PHONY: setup data repro test lint ui bench clean

setup: $(VENV)/.installed data

# Reinstall only when a requirements file changes.
$(VENV)/.installed: requirements.txt serving/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	@# OpenVINO (benchmarks only) reads its telemetry consent from this file; 0 = opted out.
	@# It has no environment-variable switch, and importing it without the file opts in.
	mkdir -p $(HOME)/intel && [ -f $(HOME)/intel/openvino_telemetry ] || echo 0 > $(HOME)/intel/openvino_telemetry
	touch $@

# Materialise the embedded default data (ELPV, CC BY-NC-SA 4.0) and check it against data.dvc.
data: $(VENV)/.installed
	$(BIN)/python -m experiments.make_data

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

# MLflow UI on http://127.0.0.1:5000 over the pipeline's tracking store (serving/mlflow_uri.py decides).
ui: $(VENV)/.installed
	$(BIN)/mlflow ui --backend-store-uri "$$($(BIN)/python -m serving.mlflow_uri)" --host 127.0.0.1 --port 5000

bench: setup
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf build mlartifacts mlflow.db
