# Two commands for a newcomer: `make run` serves the gateway, `make test` runs every check.
# Each makes its own virtual environment in .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Test processes (pytest-xdist); each starts its own simulators and PostgreSQL cluster.
WORKERS ?= 3

.PHONY: run test test-postgres lint format call whatsapp bench clean

run: $(VENV)/.deps
	$(BIN)/python -m gateway

test: $(VENV)/.deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@$(BIN)/python -c 'import os; from tests.pg import find_bin_dir as f; d = "TEST_DATABASE_URL" if os.environ.get("TEST_DATABASE_URL") else f(); print("PostgreSQL tests: " + (f"on {d}" if d else "SKIPPED (no initdb/pg_ctl; install postgresql or set TEST_DATABASE_URL)"))'
	$(BIN)/pytest -q -n $(WORKERS)

# Every test on PostgreSQL alone (make test runs the store, queue, memory and WhatsApp
# suites on both stores, and the two-instance kill test).
test-postgres: $(VENV)/.deps
	TEST_STORE=postgres $(BIN)/pytest -q -n $(WORKERS)

lint: $(VENV)/.deps
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# A simulated phone call / WhatsApp message against a gateway already running (make run).
call: $(VENV)/.deps
	$(BIN)/python scripts/call.py $(ARGS)

TEXT ?= Olá, tudo bem?
whatsapp: $(VENV)/.deps
	$(BIN)/python scripts/send_whatsapp.py "$(TEXT)" $(ARGS)

$(VENV)/.deps: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
