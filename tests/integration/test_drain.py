"""``fleetctl drain``, ``undrain`` and ``status`` against the whole sandbox (moto server, the GitLab emulator, the
served webhook, the pump, the runner agents), run as an operator runs them.

A drained pool launches nothing: a job for it waits, visibly, and launches once the pool is undrained. Its runners
are retired through reconcile's retirement: an idle one at once, a busy one only after its job succeeded. And
``status --json`` is checked against the schema it ships with, on a fleet with runners, a drain and waiting jobs.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner, Result

from chalicelib import runtime
from chalicelib.lifecycle.rules import RETIRE_GRACE_SECONDS
from chalicelib.naming import described_instance
from chalicelib.store import job_key
from fleetctl.cli import main
from fleetctl.sandbox.stack import GITLAB_ADMIN_TOKEN, Sandbox
from fleetctl.status import schema
from tests.integration.test_reconcile import OPTIONS, Fleet, stage_config
from tests.integration.test_runner_agents import wait_until

pytestmark = [pytest.mark.timeout(180), pytest.mark.scenario]

SHORT_JOB = {"name": "short", "tags": ["docker"], "script": ["sleep 0.3"]}
# Long enough to still run through the reconcile runs that pause its runner and retire the idle one.
LONG_JOB = {"name": "long", "tags": ["docker"], "script": ["sleep 15"]}


@pytest.fixture(scope="module")
def drain_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    workdir = tmp_path_factory.mktemp("drain")
    stack = Sandbox(config_path=stage_config(workdir), workdir=workdir, agent_options=OPTIONS)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
def fleet(drain_sandbox: Sandbox) -> Iterator[Fleet]:
    drain_sandbox.reset(stage_config(drain_sandbox.workdir))
    fleet = Fleet(drain_sandbox)
    yield fleet
    fleet.agents.options = OPTIONS
    for job_id in fleet.pipelines_jobs:
        if fleet.job(job_id)["status"] in ("created", "pending", "running"):
            fleet.gitlab.set_job_status(drain_sandbox.project_id, job_id, "canceled")


def fleetctl(fleet: Fleet, *args: str) -> Result:
    config = str(fleet.sandbox.workdir / "fleet.json")
    return CliRunner().invoke(main, [*args, "--config", config], env={"GITLAB_TOKEN": GITLAB_ADMIN_TOKEN})


def shell(fleet: Fleet) -> dict[str, str]:
    """The environment of an operator's shell after ``eval "$(fleetctl sandbox up --detach)"``."""
    return {
        **os.environ,
        **fleet.sandbox.exports(),
        "GITLAB_TOKEN": GITLAB_ADMIN_TOKEN,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "RUNNER_FLEET_CONFIG": str(fleet.sandbox.workdir / "fleet.json"),
        "COLUMNS": "200",
    }


def status(fleet: Fleet) -> dict[str, Any]:
    """``fleetctl status --json``, checked against the schema it ships with."""
    result = fleetctl(fleet, "status", "--json")
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.output)
    jsonschema.validate(document, schema())
    return document


def pool_status(fleet: Fleet, name: str) -> dict[str, Any]:
    [pool] = [pool for pool in status(fleet)["pools"] if pool["name"] == name]
    return pool


def instance_of(fleet: Fleet, job_id: int) -> tuple[str, int]:
    runner = fleet.job(job_id)["runner"]
    return str(described_instance(runner["description"])), int(runner["id"])


def test_a_drained_pool_retires_an_idle_runner_at_once_and_a_busy_one_only_after_its_job_succeeded(
    fleet: Fleet,
) -> None:
    fleet.agents.options = replace(OPTIONS, wait_timeout_seconds=60.0)
    # given a docker runner busy with a long job, and another idle after a short one
    long_job, short_job = fleet.pipeline(LONG_JOB, SHORT_JOB)
    assert wait_until(lambda: fleet.job(long_job)["status"] == "running", 30)
    assert wait_until(lambda: fleet.job(short_job)["status"] == "success", 30)
    busy, busy_runner = instance_of(fleet, long_job)
    idle, idle_runner = instance_of(fleet, short_job)
    assert busy != idle
    assert wait_until(lambda: fleet.record(idle).get("state") == "idle", 30)
    before = pool_status(fleet, "docker")
    assert before["runners"] == {"busy": 1, "idle": 1} and before["lifecycles"] == {"spot": 2}
    assert before["oldest_idle_seconds"] is not None and before["drain"] == {"state": "none", "since": None}

    # when the operator drains the pool without waiting, and follows it with another drain that waits
    fleet.sandbox.aws.settle()  # drain's progress reads the live index, which trails the table (as GSIs do)
    drained = fleetctl(fleet, "drain", "docker", "--no-wait")
    following = subprocess.Popen(
        [sys.executable, "-m", "fleetctl.cli", "drain", "docker", "--interval", "0.3", "--timeout", "150"],
        env=shell(fleet),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    # then --no-wait returned at once, with the runners still there, and status shows the pool draining
    assert drained.exit_code == 0, drained.output
    assert "docker drained since" in drained.output
    assert "docker: 2 runner(s) left (busy 1, idle 1), 2 lease(s) held, 0 job(s) waiting" in drained.output
    assert pool_status(fleet, "docker")["drain"]["state"] == "draining"

    # and reconcile pauses both runners, then, a grace later, retires the idle one but not the busy one
    paused = fleet.reconcile()
    assert paused.metrics == {"RunnersPaused": 2}
    assert fleet.record(busy)["draining"] == "retiring: its pool is drained"
    retired = fleet.reconcile(offset=RETIRE_GRACE_SECONDS + 1)
    assert retired.metrics == {"RunnersRetired": 1}
    assert fleet.state(idle) == "terminated" and fleet.gitlab_runner(idle_runner) is None
    assert fleet.job(long_job)["status"] == "running" and fleet.state(busy) == "running"
    assert (fleet.gitlab_runner(busy_runner) or {}).get("paused") is True

    # and once the busy runner's job succeeded, it is retired and its instance terminated
    assert wait_until(lambda: fleet.job(long_job)["status"] == "success", 60)
    assert wait_until(lambda: fleet.record(busy).get("state") == "idle", 30)
    last = fleet.reconcile(offset=RETIRE_GRACE_SECONDS + 1)
    assert last.metrics == {"RunnersRetired": 1}
    assert fleet.state(busy) == "terminated" and fleet.gitlab_runner(busy_runner) is None
    assert fleet.record(busy)["reason"] == "retired: its pool is drained"

    # and the drain that waited followed the pool to empty
    followed, _ = following.communicate(timeout=60)
    assert following.returncode == 0, followed
    lines = followed.strip().splitlines()
    assert "docker: 1 runner(s) left (busy 1), 1 lease(s) held, 0 job(s) waiting" in lines
    assert lines[-1] == "docker is empty; 0 job(s) wait for 'fleetctl undrain docker'"
    after = pool_status(fleet, "docker")
    assert after["drain"]["state"] == "drained" and after["leases"] == 0
    assert after["retired_last_hour"] == 2 and after["runners"] == {"terminated": 2}
    fleet.assert_invariants()


def test_a_job_for_a_drained_pool_waits_visibly_and_launches_once_the_pool_is_undrained(fleet: Fleet) -> None:
    # given a drained docker pool
    drained = fleetctl(fleet, "drain", "docker", "--no-wait")
    assert drained.exit_code == 0, drained.output

    # when a docker job comes
    (job_id,) = fleet.pipeline(SHORT_JOB)

    # then it waits: counted for its pool in status, pending in GitLab, never dead-lettered, and nothing launched
    assert wait_until(lambda: pool_status(fleet, "docker")["jobs_waiting"] == 1, 30)
    waiting = pool_status(fleet, "docker")
    assert waiting["drain"]["state"] == "drained" and waiting["leases"] == 0
    fleet.sandbox.pump.drain(timeout=10)
    assert fleet.job(job_id)["status"] == "pending"
    assert "outcome" not in (fleet.store.get(job_key(fleet.sandbox.project_id, job_id)) or {})
    # and a warm launch (reconcile's, for a warm pool) makes nothing for it either
    assert runtime.scale_up().launch_warm(fleet.config.pool("docker"), 1) == []
    assert fleet.live_instances() == []
    shown = fleetctl(fleet, "status")
    assert shown.exit_code == 0, shown.output
    assert "drained since" in shown.output and "invariants: ok" in shown.output

    # when the operator undrains it
    undrained = fleetctl(fleet, "undrain", "docker")

    # then the waiting job launches at its next turn and succeeds; the pool no longer shows it waiting
    assert undrained.exit_code == 0, undrained.output
    assert undrained.output.strip() == "docker undrained: 1 job(s) waiting launch at their next turn"
    assert wait_until(lambda: fleet.job(job_id)["status"] == "success", 60), fleet.job(job_id)
    after = pool_status(fleet, "docker")
    assert after["jobs_waiting"] == 0 and after["drain"] == {"state": "none", "since": None}
    fleet.assert_invariants()


def test_drain_names_the_pools_when_it_does_not_know_one(fleet: Fleet) -> None:
    result = fleetctl(fleet, "drain", "gpu", "--no-wait")
    assert result.exit_code == 2
    assert "no pool named 'gpu'" in result.output and "pools are: docker, build" in result.output


def test_status_watch_refreshes_until_ctrl_c_and_ends_cleanly(fleet: Fleet, tmp_path: Path) -> None:
    # when status --watch runs on a terminal (a pseudo-terminal: rich redraws in place only on one), and is
    # interrupted once it has drawn the fleet twice
    terminal, attached = pty.openpty()
    errors = (tmp_path / "stderr").open("w+")
    # Started as an interactive shell starts it, with SIGINT not ignored: make runs this test in a background job,
    # which ignores SIGINT, and an ignored signal stays ignored across exec (Python then installs no
    # KeyboardInterrupt handler). A handled signal is reset to its default across exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        watch = subprocess.Popen(
            [sys.executable, "-m", "fleetctl.cli", "status", "--watch", "1"],
            env={**shell(fleet), "TERM": "xterm"},
            stdin=attached,
            stdout=attached,
            stderr=errors,
            start_new_session=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    os.close(attached)
    drawn: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:
                return  # the terminal closed with the process
            if not chunk:
                return
            drawn.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: b"".join(drawn).count(b"invariants:") >= 2 or watch.poll() is not None, 60)
        assert watch.poll() is None, b"".join(drawn).decode(errors="replace")
        watch.send_signal(signal.SIGINT)
        watch.wait(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
        reader.join(timeout=5)
        os.close(terminal)

    # then it ended cleanly: exit 0, no traceback, and it drew the pools each time
    output = b"".join(drawn).decode(errors="replace")
    errors.seek(0)
    assert watch.returncode == 0, errors.read()
    errors.seek(0)
    assert "Traceback" not in errors.read()
    assert output.count("invariants:") >= 2
    assert "pool docker (docker" in output and "jobs waiting" in output
