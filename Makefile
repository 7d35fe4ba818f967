# Tally: `make demo` and `make test` are the two commands a newcomer runs. `make help` lists the rest.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
TALLY := $(VENV)/bin/tally
LOCAL := deploy/local/tally-local
# The compiled meter hot path (native/, Rust): `uv sync` builds and installs it (maturin + cargo).
NATIVE_SOURCES := native/Cargo.toml native/Cargo.lock native/pyproject.toml native/tally_native.pyi \
	$(wildcard native/src/*.rs)
# uv must use this machine's Python and never download one.
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PYTHON)

.PHONY: help install up down status topics lint test test-unit test-integration demo bench schemas clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

$(UV):
	@echo "install: uv $(UV_VERSION) into $(TOOLS)/ (from PyPI)"
	@$(PYTHON) -m venv $(TOOLS) && $(TOOLS)/bin/pip install -q "uv==$(UV_VERSION)"

$(VENV)/.synced: pyproject.toml uv.lock $(NATIVE_SOURCES) | $(UV)
	@echo "install: the locked dependencies into $(VENV)/ (uv sync --frozen; builds native/ with cargo)"
	@$(UV) sync --frozen --quiet
	@touch $@

install: $(VENV)/.synced ## create the virtualenv and install exactly the locked dependencies

up: install ## start Kafka, Postgres and Redis on loopback (deploy/local), create the topics, migrate
	@$(LOCAL) start
	@$(TALLY) topics create
	@$(TALLY) db upgrade

down: ## stop everything `make up` started
	@$(LOCAL) stop

status: ## show which local services run
	@$(LOCAL) status

lint: install ## ruff (lint + format check), mypy --strict, the layers (import-linter), the native stub against the build (stubtest); rustfmt and clippy for native/
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy
	@$(VENV)/bin/lint-imports --no-cache
	@$(VENV)/bin/python -m mypy.stubtest tally_native --allowlist native/stubtest-allowlist.txt
	@cd native && cargo fmt --check && cargo clippy --quiet --release --all-targets -- -D warnings

test-unit: install ## unit tests only (no services): native/'s Rust tests, then Python's
	@cd native && cargo test --quiet --release
	@$(VENV)/bin/pytest tests/unit -q

test: lint up ## lint, then unit, integration and fault tests against the real local services
	@cd native && cargo test --quiet --release
	@$(VENV)/bin/pytest tests -q --durations=10

demo: up ## run a worker, publish ~100,000 synthetic events, print what came out
	@$(TALLY) demo --events 100000

bench: up ## benchmarks: results in bench/results/*.json and bench/README.md
	@$(VENV)/bin/python -m bench.ingest
	@$(VENV)/bin/python -m bench.meter
	@$(VENV)/bin/python -m bench.kafka_clients

schemas: install ## re-export the JSON Schema files from the event models
	@$(VENV)/bin/python -m schemas.export

clean: down ## stop services and delete the data directory
	@rm -rf .data
