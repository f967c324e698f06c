# runner-fleet: `make demo` runs the sandbox scenario, `make test` runs the whole suite. Both set up .venv.
# `make test` also judges every AWS call the Lambda code made against its generated IAM policy
# (tests/iam_recorder.py); RUNNER_FLEET_IAM_FULL=1 adds the check that every policy statement was used or
# says why not, which only holds when the whole suite ran. `make policies` regenerates .chalice/policy-*.json.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit integration e2e bench clean sandbox-up sandbox-down policies

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fleetctl sandbox demo

test: lint typecheck
	RUNNER_FLEET_IAM_FULL=1 $(BIN)/python -m pytest -q

policies: $(STAMP)
	$(BIN)/fleetctl policies

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

e2e: $(STAMP)
	$(BIN)/python -m pytest -q tests/e2e

bench: $(STAMP)
	$(BIN)/python bench/cold_start.py
	$(BIN)/python bench/webhook_cost.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/scale_up_burst.py

sandbox-up: $(STAMP)
	$(BIN)/fleetctl sandbox up --detach

sandbox-down: $(STAMP)
	$(BIN)/fleetctl sandbox down

clean:
	rm -rf $(VENV) .sandbox .pytest_cache .mypy_cache .ruff_cache
