# runner-fleet: `make demo` runs the sandbox scenario, `make test` runs the whole suite. Both set up .venv.
# `make test` also judges every AWS call the Lambda code made against its generated IAM policy
# (tests/iam_recorder.py), then checks over both of its pytest processes' reports that every policy statement
# was used or says why not, which only holds when the whole suite ran. `make policies` regenerates
# .chalice/policy-*.json.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit integration e2e bench soak agreement clean sandbox-up sandbox-down policies package

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

# Debian packages the checks run: cloud-init (`cloud-init schema` on the rendered user data, `cloud-init clean` in
# the AMI build), bubblewrap (the isolated root install.sh runs in), amazon-ecr-credential-helper and the docker CLI
# (run against the local ECR with a pool's docker configuration; docker.io only where no docker CLI is installed,
# with policy-rc.d keeping its daemon from starting). Installed with apt-get when missing (CI runs as root); tests
# that need them fail, not skip, under RUNNER_FLEET_REQUIRE_TOOLS=1.
DEBIAN_TOOLS := cloud-init:cloud-init bwrap:bubblewrap docker-credential-ecr-login:amazon-ecr-credential-helper \
	docker:docker.io
TOOLS := $(VENV)/.tools
$(TOOLS): $(STAMP)
	@missing=""; for tool in $(DEBIAN_TOOLS); do \
		command -v "$${tool%%:*}" >/dev/null || missing="$$missing $${tool#*:}"; done; \
	if [ -n "$$missing" ]; then \
		made=""; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; \
			chmod 755 /usr/sbin/policy-rc.d; made=1; }; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		status=$$?; [ -z "$$made" ] || rm -f /usr/sbin/policy-rc.d; exit $$status; fi
	@touch $(TOOLS)

demo: $(STAMP)
	$(BIN)/fleetctl sandbox demo

# Four pytest processes side by side: the slow scenarios (a 150-job burst and a two-minute soak) with the end-to-end
# ones (the demo, the sandbox's CLI), the scenarios that drive simulated runner agents (mostly waiting on them), the
# integration tests from test_s* on, and the rest (the first integration tests and unit). Their output follows the
# rest's. Most of the suite waits on its
# local peers' lags rather than computes, so four processes finish sooner than three on two cores. Each process
# judges its own calls against IAM; the check for unused IAM statements needs the whole suite, so it runs last,
# over the four reports.
LATE_INTEGRATION := $(wildcard tests/integration/test_[s-z]*.py)
test: export RUNNER_FLEET_REQUIRE_TOOLS := 1
test: lint typecheck $(TOOLS)
	@rm -f .pytest_cache/*-tests.log .pytest_cache/iam-calls*.json
	@mkdir -p .pytest_cache
	@RUNNER_FLEET_IAM_REPORT=.pytest_cache/iam-calls-slow.json $(BIN)/python -m pytest -q --durations=15 \
		-m "(slow or e2e) and not agreement" \
		> .pytest_cache/slow-tests.log 2>&1 & slow=$$!; \
	RUNNER_FLEET_IAM_REPORT=.pytest_cache/iam-calls-scenario.json $(BIN)/python -m pytest -q --durations=15 \
		-m "scenario and not slow" > .pytest_cache/scenario-tests.log 2>&1 & scenario=$$!; \
	RUNNER_FLEET_IAM_REPORT=.pytest_cache/iam-calls-late.json $(BIN)/python -m pytest -q --durations=15 \
		-m "not slow and not scenario" $(LATE_INTEGRATION) > .pytest_cache/late-tests.log 2>&1 & late=$$!; \
	$(BIN)/python -m pytest -q --durations=25 -m "not slow and not scenario and not e2e" \
		$(addprefix --ignore=,$(LATE_INTEGRATION)); suite=$$?; \
	wait $$late; late_status=$$?; wait $$scenario; scenario_status=$$?; wait $$slow; slow_status=$$?; \
	echo "--- integration tests test_s* to test_z* (a process of their own) ---"; cat .pytest_cache/late-tests.log; \
	echo "--- agent scenarios (pytest -m scenario) ---"; cat .pytest_cache/scenario-tests.log; \
	echo "--- slow scenarios and the demo's (pytest -m 'slow or e2e') ---"; cat .pytest_cache/slow-tests.log; \
	test $$suite -eq 0 && test $$late_status -eq 0 && test $$scenario_status -eq 0 && test $$slow_status -eq 0
	@$(BIN)/python -m tests.iam_recorder .pytest_cache/iam-calls.json .pytest_cache/iam-calls-late.json \
		.pytest_cache/iam-calls-scenario.json .pytest_cache/iam-calls-slow.json

# A stage's CloudFormation template (fleetctl/package.py): the stack's merge template generated from the stage file
# (fleetctl/stack_template.py), `chalice package --pkg-format cloudformation --merge-template` into PACKAGE_DIR
# (sam.json, deployment.zip; Chalice downloads requirements.txt from the package index), then cfn-lint, which must
# report nothing. The region is the stage file's (Chalice needs one to start; the template names none).
STAGE ?= dev
PACKAGE_DIR ?= build/package/$(STAGE)
package: $(STAMP)
	$(BIN)/python -m fleetctl.package --stage $(STAGE) --out $(PACKAGE_DIR)

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
	$(BIN)/python -m pytest -q -m "not agreement" tests/e2e

# The soak (fleetctl/sandbox/soak.py): SOAK_MINUTES of load and faults, then everything accounted for; SOAK_SEED
# replays a run (by default the seed comes from the clock and is printed).
SOAK_MINUTES ?= 10
SOAK_SEED ?=
soak: $(STAMP)
	$(BIN)/python -m fleetctl.sandbox.soak --minutes $(SOAK_MINUTES) $(if $(SOAK_SEED),--seed $(SOAK_SEED))

bench: $(STAMP)
	$(BIN)/python bench/cold_start.py
	$(BIN)/python bench/webhook_cost.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/scale_up_burst.py
	$(BIN)/python bench/job_start.py
	$(BIN)/python bench/reconcile.py
	$(BIN)/python bench/image_rotation.py
	$(BIN)/python bench/simulate.py

# The simulator against the sandbox: one trace through both, compared (three to five minutes, more than make test's
# budget allows, so not part of it).
agreement: $(STAMP)
	$(BIN)/python -m pytest -q -m agreement tests/e2e/test_simulate_agreement.py

sandbox-up: $(STAMP)
	$(BIN)/fleetctl sandbox up --detach

sandbox-down: $(STAMP)
	$(BIN)/fleetctl sandbox down

clean:
	rm -rf $(VENV) .sandbox .pytest_cache .mypy_cache .ruff_cache
