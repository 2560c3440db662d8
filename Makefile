# Two commands for a newcomer: `make run` and `make test`. Both install what they need, idempotently.
VENV ?= .venv
PY := $(VENV)/bin/python
REMEDY := $(VENV)/bin/remedy

.PHONY: setup run check lint test unit bench clean

setup:
	REMEDY_VENV=$(VENV) bash scripts/setup.sh

run: setup
	$(REMEDY) check policies playbooks
	$(REMEDY) run --dry-run --policies policies --playbooks playbooks --audit audit.jsonl

check: setup
	$(REMEDY) check policies playbooks

lint: setup
	$(VENV)/bin/ruff check remedy tests bench testkit
	$(VENV)/bin/ruff format --check remedy tests bench testkit
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest -ra

unit: setup
	$(PY) -m pytest -ra tests/unit tests/actuators

bench: setup
	$(PY) -m bench.funnel
	$(PY) -m bench.signals
	$(PY) -m bench.fastpath
	$(PY) -m bench.offenders
	$(PY) -m bench.moves
	$(PY) -m bench.agent_cost

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache audit.jsonl
