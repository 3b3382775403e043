# One entry point for every habit. `make demo` and `make test` are the two commands in README.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt pyproject.toml | sha1sum | cut -c1-12)

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint format bench services-start services-stop clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-* && touch $@

DEMO_MODEL := .quarkflow/artifacts/demo-smallcnn
PORT ?= 8000
WB_PORT ?= 8501

demo: install  ## embedded default: SQLite + ./.quarkflow folder
	$(BIN)/quarkflow db upgrade
	$(BIN)/quarkflow seed-demo
	@if [ -f $(DEMO_MODEL)/manifest.json ]; then echo "demo model already trained: $(DEMO_MODEL)"; \
	else $(BIN)/quarkflow train --out $(DEMO_MODEL) && $(BIN)/quarkflow export $(DEMO_MODEL) --format onnx; fi
	$(BIN)/quarkflow demo-bootstrap $(DEMO_MODEL)
	@echo
	@echo "Demo data and a trained, calibrated, ONNX-exported champion model are in .quarkflow/."
	@echo "Workbench: http://127.0.0.1:$(WB_PORT) (sign in as demo-lead / quarkflow-demo)"
	@echo "Demo:      http://127.0.0.1:$(PORT)/demo   API docs: http://127.0.0.1:$(PORT)/docs   Ctrl-C stops both."
	$(BIN)/quarkflow workbench --host 127.0.0.1 --port $(WB_PORT) & wb=$$!; \
	trap 'kill $$wb 2>/dev/null' EXIT INT TERM; \
	$(BIN)/quarkflow serve --host 127.0.0.1 --port $(PORT)

test: install  ## starts Postgres + fake-gcs-server if needed, runs everything, stops them
	scripts/test.sh $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m bench

services-start: install
	scripts/services.sh start

services-stop:
	scripts/services.sh stop

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info
