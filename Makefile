# Fresh-machine friendly: `make test` creates .venv, installs everything, lints and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pinned exactly and installed first: a range would make pip resolve a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: install test lint bench serve

# System packages the tests use: redis-server (cluster tests) and Debian's chromium (the dashboard's
# headless-browser test); one apt-get update for whatever is missing.
install: $(STAMP)
	@missing=; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update && $$SUDO apt-get install -y $$missing; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

bench: install
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/kv_moves.py
	$(BIN)/aegaeon bench switch
	$(BIN)/python benchmarks/scheduling.py
	$(BIN)/python benchmarks/load.py
	$(BIN)/python benchmarks/sim_validate.py --profiles loop
	$(BIN)/python benchmarks/sim_serverless_start.py
	$(BIN)/python benchmarks/guidellm_rate.py

# Demo models (tiny, random weights, real tokenizer) written once, then served on the CPU, colocated.
DEMO_DIR := .demo-models
PORT ?= 8000
serve: install
	@test -d $(DEMO_DIR) || $(BIN)/aegaeon demo-models $(DEMO_DIR) --count 3
	$(BIN)/aegaeon serve $(DEMO_DIR)/demo-* --device cpu --colocated --port $(PORT) --profiles $(DEMO_DIR)/profiles.json
