"""Spot interruptions end to end: EC2's warning pauses the runner, the job it loses is retried once elsewhere.

The whole sandbox runs (moto server, the GitLab emulator, the served webhook, the event pump, the agents). The
sandbox plays EC2: it puts the documented "EC2 Spot Instance Interruption Warning" (or "EC2 Instance Rebalance
Recommendation") on moto's default bus, which routes it by the app's rule to the interruption handler; after the
notice the instance's operating system shuts down under its agent, which fails its job as gitlab-runner does on a
system interrupt, and the instance is terminated. Each test checks what a user would see in GitLab, EC2 and the
fleet table, and ends with nothing left: no live instance, lease, GitLab runner or token.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetctl.sandbox.agents import AgentOptions, AgentRecord, JobOutcome, Phase
from fleetctl.sandbox.ec2_events import interrupt_spot_instance, recommend_rebalance, warn_of_interruption
from fleetctl.sandbox.stack import DEFAULT_CONFIG, Sandbox
from tests.integration.test_runner_agents import Stack, _nothing_left, wait_until

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.scenario,
    # Invocations that count nothing (most of them) make Powertools warn once metrics are on.
    pytest.mark.filterwarnings("ignore:No application metrics to publish"),
]

WAIT_TIMEOUT = 2.0
OPTIONS = AgentOptions(boot_delay_seconds=0.3, wait_timeout_seconds=WAIT_TIMEOUT, check_interval_seconds=0.2)
# Long enough for the warning to be handled while it runs; the retried job runs it whole.
JOB = {"name": "build", "tags": ["docker"], "script": ["echo building", "sleep 3"]}


@pytest.fixture(scope="module")
def interruptions_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    stack = Sandbox(workdir=tmp_path_factory.mktemp("interruptions"), agent_options=OPTIONS)
    stack.start()
    yield stack
    stack.stop()


class Interrupting(Stack):
    """The sandbox as these tests look at it, and EC2 interrupting its instances."""

    def __init__(self, sandbox: Sandbox) -> None:
        from chalicelib import runtime

        super().__init__(sandbox)
        self.events = runtime.aws().client("events")

    def gitlab_runner(self, runner_id: int) -> dict[str, Any] | None:
        return next((r for r in self.gitlab.runners() if r["id"] == runner_id), None)

    def paused(self, runner_id: int) -> bool:
        runner = self.gitlab_runner(runner_id)
        return runner is not None and bool(runner["paused"])

    def running(self, job_id: int) -> AgentRecord:
        """The agent running ``job_id``, once GitLab shows it running (an agent lists a job once it ended)."""
        assert wait_until(lambda: self.job(job_id)["status"] == "running", 20), self.job(job_id)["status"]
        runner_id = self.job(job_id)["runner"]["id"]
        return next(r for r in self.agents.records() if r.runner_id == runner_id)

    def interrupt(self, agent: AgentRecord, seen: list[str]) -> threading.Thread:
        """EC2 interrupts the agent's instance: the warning at once, and the shutdown and termination once the
        warning has visibly been handled (the runner is paused in GitLab), so the test does not race the pump."""
        assert agent.runner_id is not None
        runner_id = agent.runner_id

        def notice(_seconds: float) -> None:
            assert wait_until(lambda: self.paused(runner_id), 10), "the warning did not pause the runner"
            seen.append("paused before the shutdown")

        thread = threading.Thread(
            target=interrupt_spot_instance,
            args=(self.ec2, self.events, agent.instance_id),
            kwargs={"shut_down": self.agents.shut_down, "sleep": notice},
        )
        thread.start()
        return thread

    def jobs_named(self, pipeline_job: int) -> list[dict[str, Any]]:
        """Every try of a job, retries included, oldest first."""
        pipeline_id = int(self.job(pipeline_job)["pipeline"]["id"])
        name = self.job(pipeline_job)["name"]
        return [j for j in self.gitlab.jobs_of_pipeline(self.sandbox.project_id, pipeline_id) if j["name"] == name]


@pytest.fixture(autouse=True)
def observed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The handlers' metrics (EMF) and info logs printed, as a deployed Lambda prints them (the suite turns both
    off); Powertools reads the switch at each flush."""
    from chalicelib.observability import logger

    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    level = logger.log_level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


@pytest.fixture
def stack(interruptions_sandbox: Sandbox) -> Iterator[Interrupting]:
    interruptions_sandbox.reset()
    yield from _stack(interruptions_sandbox)


def _stack(sandbox: Sandbox) -> Iterator[Interrupting]:
    stack = Interrupting(sandbox)
    yield stack
    # The fleet's runners are group runners: a job this test left pending would go to the next test's runner.
    for job_id in stack.pipelines_jobs:
        for job in stack.jobs_named(job_id):
            if job["status"] in ("created", "pending", "running"):
                stack.gitlab.set_job_status(sandbox.project_id, int(job["id"]), "canceled")


def violations(stack: Stack) -> list[str]:
    """The fleet's invariants, checked against moto and the emulator (chalicelib/lifecycle/invariants.py)."""
    from chalicelib import runtime
    from chalicelib.lifecycle.facts import FactSource
    from chalicelib.lifecycle.invariants import check

    stack.sandbox.aws.settle()  # EC2's state-change events come a moment after the state changed
    source = FactSource(stack.config, runtime.store(), stack.ec2, runtime.gitlab_api())
    return [str(v) for v in check(source.gather(tokens=True), stack.config)]


def assert_invariants(stack: Stack) -> None:
    """The invariants hold once the events in flight were handled."""
    assert wait_until(lambda: not violations(stack), 15), violations(stack)


def metric_total(output: str, name: str) -> int:
    """The sum of one EMF count metric over every document the handlers printed."""
    total = 0
    for line in output.splitlines():
        if '"_aws"' not in line:
            continue
        document = json.loads(line)
        if name in document:
            value = document[name]
            total += int(sum(value) if isinstance(value, list) else value)
    return total


def logged(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    """The handlers' log records of one message (their ``extra`` facts are attributes)."""
    return [record for record in caplog.records if record.getMessage() == message]


def test_a_spot_interruption_during_a_job_ends_with_the_job_retried_once_on_another_runner(
    stack: Interrupting, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """EC2 warns two minutes before it interrupts a spot instance ("EC2 Spot Instance Interruption Warning", EC2
    User Guide, spot-instance-termination-notices.html). The runner is paused (``PUT /runners/:id`` paused,
    doc/api/runners.md) and marked draining; at the shutdown gitlab-runner fails the job with
    ``runner_system_failure`` (common/build.go, the SystemInterrupt case); the job is retried once through
    ``POST /projects/:id/jobs/:job_id/retry`` (doc/api/jobs.md), and the new job runs on a new instance."""
    # given a job running on a spot runner
    (job_id,) = stack.pipeline(JOB)
    agent = stack.running(job_id)
    record = stack.record(agent.instance_id)
    assert record["lifecycle"] == "spot"

    # when EC2 interrupts its instance
    seen: list[str] = []
    stack.interrupt(agent, seen).join(timeout=30)

    # then the job failed as a runner system failure, and exactly one retry of it succeeded on another runner
    assert wait_until(lambda: len(stack.jobs_named(job_id)) == 2, 20), stack.jobs_named(job_id)
    original, retry = stack.jobs_named(job_id)
    assert wait_until(lambda: stack.job(int(retry["id"]))["status"] == "success", 30)
    original, retry = stack.jobs_named(job_id)
    assert (original["id"], original["status"], original["failure_reason"]) == (
        job_id,
        "failed",
        "runner_system_failure",
    )
    assert retry["runner"]["id"] != agent.runner_id
    assert agent.instance_id not in retry["runner"]["description"]
    trace = stack.gitlab.job_trace(stack.sandbox.project_id, job_id).decode()
    assert "ERROR: Job failed (system failure): aborted: terminated" in trace
    # the interrupted runner was paused before its instance went, and deleted after
    assert seen == ["paused before the shutdown"]
    assert agent.jobs == [(job_id, JobOutcome.RUNNER_SYSTEM_FAILURE)]
    assert (agent.ended, agent.phase) == ("system shutdown", Phase.DONE)
    assert wait_until(lambda: stack.gitlab_runner(agent.runner_id or 0) is None, 10)
    interrupted = stack.record(agent.instance_id)
    assert interrupted["draining"] == "spot interruption warning"
    assert interrupted["interruptions"] == {"spot interruption warning"}
    assert interrupted["state"] == "terminated"
    # the job's record says which retry GitLab made
    job_item = stack.store.get(f"JOB#{stack.sandbox.project_id}:{job_id}") or {}
    assert job_item["interruption_retry_job"] == retry["id"]
    # and nothing is left once the new runner idles out
    assert wait_until(lambda: _nothing_left(stack), WAIT_TIMEOUT + 20)
    assert_invariants(stack)
    output = capfd.readouterr().out
    assert metric_total(output, "InterruptionsHandled") == 1
    assert metric_total(output, "JobsRetriedAfterInterruption") == 1
    [handled] = logged(caplog, "runner interrupted: draining")
    assert (vars(handled)["instance_id"], vars(handled)["reason"], vars(handled)["instance_action"]) == (
        agent.instance_id,
        "spot interruption warning",
        "terminate",
    )
    assert vars(handled)["busy"] == [f"{stack.sandbox.project_id}:{job_id}"]


def test_a_duplicate_warning_changes_nothing_and_the_job_is_still_retried_once(
    stack: Interrupting, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """EventBridge delivers at least once; EC2 sends its warning once per interruption. A second delivery finds
    the runner marked for it: no second count, no second mark, and still one retry."""
    # given a running job whose runner EC2 warned about
    (job_id,) = stack.pipeline(JOB)
    agent = stack.running(job_id)
    assert agent.runner_id is not None
    runner_id = agent.runner_id
    warn_of_interruption(stack.ec2, stack.events, agent.instance_id)
    assert wait_until(lambda: stack.paused(runner_id), 10)
    marked = stack.record(agent.instance_id)

    # when the same warning comes again
    warn_of_interruption(stack.ec2, stack.events, agent.instance_id)
    assert wait_until(lambda: bool(logged(caplog, "interruption already handled")), 10)

    # then the record is as the first left it, the job still runs, and one interruption was counted
    again = stack.record(agent.instance_id)
    assert {k: again[k] for k in ("interrupted_at", "interruptions", "draining_at")} == {
        k: marked[k] for k in ("interrupted_at", "interruptions", "draining_at")
    }
    assert stack.job(job_id)["status"] == "running"

    # and when the instance then goes, the job is retried once
    seen: list[str] = []
    stack.interrupt(agent, seen).join(timeout=30)
    assert wait_until(lambda: len(stack.jobs_named(job_id)) == 2, 20)
    retry = stack.jobs_named(job_id)[1]
    assert wait_until(lambda: stack.job(int(retry["id"]))["status"] == "success", 30)
    assert wait_until(lambda: _nothing_left(stack), WAIT_TIMEOUT + 20)
    assert_invariants(stack)
    assert len(stack.jobs_named(job_id)) == 2
    output = capfd.readouterr().out
    assert metric_total(output, "InterruptionsHandled") == 1
    assert metric_total(output, "JobsRetriedAfterInterruption") == 1


@pytest.fixture
def no_retry_stack(interruptions_sandbox: Sandbox, tmp_path: Path) -> Iterator[Interrupting]:
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for pool in document["pools"]:
        pool["retry_interrupted_jobs"] = False
    config = tmp_path / "no-retry.yaml"
    config.write_text(yaml.safe_dump(document))
    interruptions_sandbox.reset(config)
    yield from _stack(interruptions_sandbox)


def test_a_pool_that_does_not_retry_leaves_the_lost_job_failed(
    no_retry_stack: Interrupting, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """``retry_interrupted_jobs: false``: the runner is still paused and drained, but its lost job stays failed."""
    stack = no_retry_stack
    assert not any(pool.retry_interrupted_jobs for pool in stack.config.pools)
    # given
    (job_id,) = stack.pipeline(JOB)
    agent = stack.running(job_id)

    # when
    seen: list[str] = []
    stack.interrupt(agent, seen).join(timeout=30)

    # then
    assert wait_until(lambda: stack.job(job_id)["status"] == "failed", 15)
    assert wait_until(lambda: _nothing_left(stack), WAIT_TIMEOUT + 20)
    assert_invariants(stack)
    output = capfd.readouterr().out
    [not_retried] = logged(caplog, "job lost to an interruption not retried")
    assert vars(not_retried)["reason"] == "pool does not retry interrupted jobs"
    assert len(stack.jobs_named(job_id)) == 1
    assert stack.job(job_id)["failure_reason"] == "runner_system_failure"
    assert seen == ["paused before the shutdown"]
    assert metric_total(output, "JobsRetriedAfterInterruption") == 0
    assert metric_total(output, "InterruptionsHandled") == 1


def test_a_rebalance_recommendation_pauses_and_marks_the_runner_but_lets_its_job_finish(
    stack: Interrupting, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """ "EC2 Instance Rebalance Recommendation" (EC2 User Guide, rebalance-recommendations.html) says the instance
    is at elevated risk of interruption, not that it goes: the runner takes no new job, its job finishes, and the
    next job gets a new instance while the paused runner idles out."""
    # given
    first, second = stack.pipeline(
        {"name": "compile", "stage": "build", "tags": ["docker"], "script": ["sleep 1"]},
        {"name": "unit", "stage": "test", "tags": ["docker"], "script": ["sleep 0.2"]},
        stages=["build", "test"],
    )
    agent = stack.running(first)
    assert agent.runner_id is not None
    runner_id = agent.runner_id

    # when
    recommend_rebalance(stack.ec2, stack.events, agent.instance_id)

    # then the runner is paused and marked, its job succeeds, and the next stage's job runs elsewhere
    assert wait_until(lambda: stack.paused(runner_id), 10)
    record = stack.record(agent.instance_id)
    assert record["draining"] == "rebalance recommendation"
    assert record["interruptions"] == {"rebalance recommendation"}
    assert "idle_pool" not in record
    assert wait_until(lambda: stack.job(second)["status"] == "success", 30)
    assert stack.job(first)["status"] == "success"
    assert stack.agent_of(second).instance_id != agent.instance_id
    assert agent.jobs == [(first, JobOutcome.SUCCESS)]
    # the paused runner takes nothing more and powers off after its wait, as any idle runner does
    assert wait_until(lambda: _nothing_left(stack), WAIT_TIMEOUT + 20)
    assert_invariants(stack)
    assert agent.ended == "wait timeout"
    # a recommendation is not an interruption: the record is not marked interrupted, so a job failing on the
    # runner later is the user's failure, never retried as one the fleet lost
    assert "interrupted_at" not in stack.record(agent.instance_id)
    output = capfd.readouterr().out
    assert metric_total(output, "InterruptionsHandled") == 1
    assert metric_total(output, "JobsRetriedAfterInterruption") == 0
