# One entry point for every habit. `make demo` and `make test` are the two commands in README.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml | sha1sum | cut -c1-12)
# tritonclient, for tests/test_oip.py: its pins conflict with ours, so it has its own venv
CLIENTS_VENV := .venv-clients
CLIENTS_STAMP := $(CLIENTS_VENV)/.installed-$(shell cat requirements-clients.txt | sha1sum | cut -c1-12)

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint format bench services-start services-stop clean

install: $(STAMP) $(CLIENTS_STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-* && touch $@

$(CLIENTS_STAMP): requirements-clients.txt
	@test -x $(CLIENTS_VENV)/bin/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install -q -r requirements-clients.txt
	@rm -f $(CLIENTS_VENV)/.installed-* && touch $@

PORT ?= 8000
WB_PORT ?= 8501
PREFECT_PORT ?= 4200

# Everything on the embedded default (SQLite + ./.quarkflow): migrate, seed, train + approve the
# first champion (once), then the API + Gradio demo, the workbench and the worker (local Prefect
# server), wired together, with some unseen traffic. One Ctrl-C or SIGTERM stops all of them.
demo: install
	exec $(BIN)/quarkflow demo --port $(PORT) --wb-port $(WB_PORT) --prefect-port $(PREFECT_PORT) $(DEMO_ARGS)

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
