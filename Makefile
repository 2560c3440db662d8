# Two commands for a newcomer: `make run` and `make test`. Both install what they need, idempotently.
VENV ?= .venv
PY := $(VENV)/bin/python
REMEDY := $(VENV)/bin/remedy

.PHONY: setup run check lint test unit bench vmtest clean

setup:
	REMEDY_VENV=$(VENV) bash scripts/setup.sh

run: setup
	$(REMEDY) check policies playbooks
	$(REMEDY) run --dry-run --policies policies --playbooks playbooks --audit audit.jsonl

check: setup
	$(REMEDY) check policies playbooks

lint: setup
	$(VENV)/bin/ruff check remedy tests bench testkit vmtest
	$(VENV)/bin/ruff format --check remedy tests bench testkit vmtest
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

# A second host: pure cgroup v2 under a real systemd, booted in qemu (docs/vmtest.md). Builds the
# image once per recipe (cached in /var/cache/remedy-vmtest), one host test per in-VM test.
vmtest: setup
	bash vmtest/host-deps.sh
	$(PY) -m pytest -ra -p no:cacheprovider --timeout=2400 vmtest/test_vm.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache audit.jsonl .vmtest
