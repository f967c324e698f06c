"""The sandbox's runner agents play runner instances the way the boot steps of runner_ami/README.md say.

The whole sandbox runs (moto server behind the AWS shim, the GitLab emulator, the served webhook, the event pump,
the agents): a pipeline's Job Hooks reach scale-up, which launches an instance and writes its token; the agent of
that instance boots and runs the job, and its power-off comes back as EC2's state-change event. Each test checks
what a user of the fleet would see in GitLab, EC2 and the fleet table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chalicelib.naming import FLEET_TAG, POOL_TAG, launch_template_name, runner_description, runner_role_name
from chalicelib.scaling.tokens import RunnerRoles, RunnerTokens
from chalicelib.store import pool_key, runner_key
from fleetctl.sandbox.agents import AgentOptions, AgentRecord, Fault, JobOutcome, Phase
from fleetctl.sandbox.stack import Sandbox

pytestmark = [pytest.mark.timeout(90), pytest.mark.scenario]

WAIT_TIMEOUT = 2.0
OPTIONS = AgentOptions(boot_delay_seconds=0.3, wait_timeout_seconds=WAIT_TIMEOUT, check_interval_seconds=0.2)


@pytest.fixture(scope="module")
def agents_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    stack = Sandbox(workdir=tmp_path_factory.mktemp("agents"), agent_options=OPTIONS)
    stack.start()
    yield stack
    stack.stop()


class Stack:
    """The sandbox as the tests look at it: GitLab, EC2, the fleet table and the agents."""

    def __init__(self, sandbox: Sandbox) -> None:
        from chalicelib import runtime

        self.sandbox = sandbox
        self.gitlab = sandbox.gitlab
        assert sandbox.agents is not None and sandbox.config is not None
        self.agents = sandbox.agents
        self.config = sandbox.config
        self.ec2 = runtime.aws().ec2
        self.store = runtime.store()
        self.pipelines_jobs: list[int] = []

    def pipeline(self, *jobs: dict[str, Any], stages: list[str] | None = None) -> list[int]:
        pipeline_id = self.gitlab.create_pipeline(self.sandbox.project_id, list(jobs), stages=stages)
        job_ids = [int(j["id"]) for j in self.gitlab.jobs_of_pipeline(self.sandbox.project_id, pipeline_id)]
        self.pipelines_jobs += job_ids
        return job_ids

    def job(self, job_id: int) -> dict[str, Any]:
        return self.gitlab.job(self.sandbox.project_id, job_id)

    def state(self, instance_id: str) -> str:
        self.sandbox.aws.settle()  # DescribeInstances lags behind a launch, as EC2's does
        found = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        return str(found["State"]["Name"])

    def record(self, instance_id: str) -> dict[str, Any]:
        return self.store.get(runner_key(instance_id)) or {}

    def leases(self, pool: str) -> int:
        return int((self.store.get(pool_key(pool)) or {}).get("leases", 0))

    def agent_of(self, job_id: int, timeout: float = 20.0) -> AgentRecord:
        """The agent that took ``job_id``."""
        found: list[AgentRecord] = []

        def took() -> bool:
            found[:] = [r for r in self.agents.records() if any(j == job_id for j, _ in r.jobs)]
            return bool(found)

        assert wait_until(took, timeout), f"no agent took job {job_id}: {self.agents.records()}"
        return found[0]

    def booted(self, pool: str, count: int = 1, timeout: float = 20.0) -> list[AgentRecord]:
        assert wait_until(lambda: len([r for r in self.agents.records() if r.pool == pool]) >= count, timeout)
        return [r for r in self.agents.records() if r.pool == pool]


class _PutItemTaken:
    """Stands in for the DynamoDB client to take the PutItem request ``RunnerTokens.put`` makes, unsent."""

    def __init__(self) -> None:
        self.request: dict[str, Any] = {}

    def put_item(self, **request: Any) -> None:
        self.request = request


def launch(stack: Stack, pool: str) -> str:
    """An instance launched from ``pool``'s launch template and tagged as the fleet's, as CreateFleet launches one;
    its agent boots as any other's. Returns its id."""
    template = launch_template_name(stack.config.fleet, pool)
    tags = [{"Key": FLEET_TAG, "Value": stack.config.fleet}, {"Key": POOL_TAG, "Value": pool}]
    launched = stack.ec2.run_instances(
        LaunchTemplate={"LaunchTemplateName": template, "Version": "$Default"},
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )
    return str(launched["Instances"][0]["InstanceId"])


def hand_off(stack: Stack, pool: str, instance_id: str, *, idle_wait_seconds: int | None = None) -> int:
    """What scale-up does for an instance it launched: make its GitLab runner, then write its token item under the
    instance role session's key (``RunnerTokens.key`` and ``put``). ``idle_wait_seconds`` (a warm runner's) is added
    to the item ``RunnerTokens.put`` makes before it is written, in the one PutItem, since the agent may read the
    item at any moment. Returns the GitLab runner's id."""
    from chalicelib import runtime

    config = stack.config.pool(pool)
    credentials = runtime.gitlab_api().create_runner(
        description=runner_description(stack.config.fleet, pool, instance_id),
        tags=config.tags,
        run_untagged=config.run_untagged,
        maximum_timeout=config.job_timeout_seconds,
    )
    roles = RunnerRoles(runtime.aws().client("iam"), {pool: runner_role_name(stack.config.fleet, pool)})
    taken = _PutItemTaken()
    tokens = RunnerTokens(taken, stack.config.state.table, roles)
    tokens.put(
        tokens.key(pool, instance_id), instance_id, credentials.token, time.time() + config.boot_deadline_seconds
    )
    if idle_wait_seconds is not None:
        taken.request["Item"]["idle_wait_seconds"] = {"N": str(idle_wait_seconds)}
    runtime.aws().dynamodb.put_item(**taken.request)
    return credentials.runner_id


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.fixture
def stack(agents_sandbox: Sandbox) -> Iterator[Stack]:
    agents_sandbox.reset()
    stack = Stack(agents_sandbox)
    yield stack
    # The fleet's runners are group runners: a job this test left pending would go to the next test's runner.
    for job_id in stack.pipelines_jobs:
        if stack.job(job_id)["status"] in ("created", "pending", "running"):
            stack.gitlab.set_job_status(agents_sandbox.project_id, job_id, "canceled")


def test_an_agent_boots_as_the_contract_says_runs_its_job_and_powers_off_after_the_wait_timeout(
    stack: Stack,
) -> None:
    """Boot steps 1-12 of runner_ami/README.md, each by its effect: the token item is read and gone
    (6, 7), the runner verified with a system id (10, ``POST /runners/verify``, doc/api/runners.md "Verify
    authentication for a registered runner"), the job taken (``POST /jobs/request``), reported running and then
    successful (``PUT /jobs/:id``, lib/api/ci/runner.rb) with its log (``PATCH /jobs/:id/trace``), and the
    instance terminated once no job came for the wait timeout (gitlab-runner commands/single.go
    checkFinishedConditions), which hands its lease back and deletes its GitLab runner (the instance-state
    handler)."""
    # given
    (job_id,) = stack.pipeline({"name": "build", "tags": ["docker"], "script": ["echo building", "sleep 0.5"]})

    # when
    agent = stack.agent_of(job_id)
    instance_id = agent.instance_id
    record = stack.record(instance_id)
    assert wait_until(lambda: stack.job(job_id)["status"] == "success", 15)
    finished = time.monotonic()
    assert wait_until(lambda: stack.state(instance_id) == "terminated", WAIT_TIMEOUT + 10)
    idle = time.monotonic() - finished

    # then
    assert stack.store.get(record["token_key"]) is None, "the instance deleted its token item"
    job = stack.job(job_id)
    assert job["runner"]["id"] == record["gitlab_runner_id"] == agent.runner_id
    assert instance_id in job["runner"]["description"]
    trace = stack.gitlab.job_trace(stack.sandbox.project_id, job_id).decode()
    assert "$ echo building" in trace and "$ sleep 0.5" in trace
    calls = stack.gitlab.calls
    assert calls[("POST", "/runners/verify")] >= 1
    assert calls[("PUT", "/jobs/:job_id")] >= 2  # running, then success
    assert idle >= WAIT_TIMEOUT - 0.5, f"powered off {idle:.1f}s after its job, before the wait timeout"
    assert wait_until(lambda: agent.terminated, 5) and agent.ended == "wait timeout"
    assert agent.jobs == [(job_id, JobOutcome.SUCCESS)]
    # The power-off reached the fleet: lease back, GitLab runner gone.
    assert wait_until(lambda: stack.leases("docker") == 0, 10)
    assert wait_until(lambda: all(r["id"] != agent.runner_id for r in stack.gitlab.runners()), 10)


def test_the_job_hooks_of_an_agent_run_name_its_runner(stack: Stack) -> None:
    """GitLab's Job Hook for running and finished carries the runner that took the job (id, description, tags:
    lib/gitlab/data_builder/build.rb ``runner``; doc/user/project/integrations/webhook_events.md "Job events")."""
    # given
    (job_id,) = stack.pipeline({"name": "unit", "tags": ["docker"], "script": ["sleep 0.2"]})

    # when
    agent = stack.agent_of(job_id)
    assert wait_until(lambda: stack.job(job_id)["status"] == "success", 15)
    stack.gitlab.wait_for_deliveries(timeout=10)

    # then
    hooks = [d.payload for d in stack.gitlab.deliveries if d.payload.get("build_id") == job_id]
    by_status = {h["build_status"]: h for h in hooks}
    for status in ("running", "success"):
        runner = by_status[status]["runner"]
        assert runner["id"] == agent.runner_id
        assert agent.instance_id in runner["description"]
        assert "docker" in runner["tags"]


def test_a_runner_with_builds_left_takes_the_next_stage_job_itself(stack: Stack) -> None:
    """run-single keeps asking for jobs until max builds or the wait timeout (commands/single.go), so the
    instance that ran stage one's job takes stage two's while it waits."""
    # given
    first, second = stack.pipeline(
        {"name": "compile", "stage": "build", "tags": ["docker"], "script": ["sleep 0.2"]},
        {"name": "unit", "stage": "test", "tags": ["docker"], "script": ["sleep 0.2"]},
        stages=["build", "test"],
    )

    # when
    agent = stack.agent_of(first)
    assert wait_until(lambda: stack.job(second)["status"] == "success", 20)

    # then
    assert stack.agent_of(second).instance_id == agent.instance_id
    assert agent.jobs == [(first, JobOutcome.SUCCESS), (second, JobOutcome.SUCCESS)]


def test_an_ephemeral_runner_runs_exactly_one_job_then_powers_off(stack: Stack) -> None:
    """``--max-builds 1`` (RUNNER_MAX_BUILDS of an ephemeral pool): MaxBuilds reaches 0 after the build and
    run-single exits at once (commands/single.go postBuild, checkFinishedConditions), without waiting; the next
    stage's job gets an instance of its own."""
    # given
    first, second = stack.pipeline(
        {"name": "image", "stage": "build", "tags": ["dind"], "script": ["sleep 0.2"]},
        {"name": "push", "stage": "test", "tags": ["dind"], "script": ["sleep 0.2"]},
        stages=["build", "test"],
    )

    # when
    one = stack.agent_of(first)
    assert wait_until(lambda: stack.state(one.instance_id) == "terminated", WAIT_TIMEOUT)
    two = stack.agent_of(second)
    assert wait_until(lambda: stack.job(second)["status"] == "success", 20)

    # then
    assert one.instance_id != two.instance_id
    assert one.jobs == [(first, JobOutcome.SUCCESS)] and one.ended == "max builds"
    assert wait_until(lambda: two.ended == "max builds" and two.terminated, 5)
    assert two.jobs == [(second, JobOutcome.SUCCESS)]


def test_a_script_exiting_non_zero_fails_the_job_as_a_script_failure(stack: Stack) -> None:
    """gitlab-runner reports a build whose script exits non-zero as ``failed`` with ``script_failure`` and its
    exit code (common/build.go, ``BuildError{FailureReason: ScriptFailure}``); the runner goes on."""
    # given
    (job_id,) = stack.pipeline({"name": "lint", "tags": ["docker"], "script": ["echo linting", "exit 3", "sleep 9"]})

    # when
    agent = stack.agent_of(job_id)
    assert wait_until(lambda: stack.job(job_id)["status"] == "failed", 15)

    # then
    assert stack.job(job_id)["failure_reason"] == "script_failure"
    assert "$ sleep 9" not in stack.gitlab.job_trace(stack.sandbox.project_id, job_id).decode()
    assert agent.jobs == [(job_id, JobOutcome.SCRIPT_FAILURE)]
    assert wait_until(lambda: agent.ended == "wait timeout", WAIT_TIMEOUT + 5)


def test_an_agent_hung_at_boot_never_contacts_gitlab_and_its_instance_stays_up(stack: Stack) -> None:
    """A boot that hangs (cloud-init or the boot script stuck) leaves a running instance whose token is never
    read and whose GitLab runner is never contacted (``status`` never_contacted, doc/api/runners.md); the job
    stays pending. Finding such instances is the boot deadline's work (reconcile)."""
    # given
    stack.agents.faults.for_next_agent("docker", Fault.HANG_AT_BOOT)
    (job_id,) = stack.pipeline({"name": "build", "tags": ["docker"]})

    # when
    (agent,) = stack.booted("docker")
    assert wait_until(lambda: agent.phase is Phase.HUNG, 10)
    record: dict[str, Any] = {}
    assert wait_until(lambda: bool(record.update(stack.record(agent.instance_id)) or record.get("token_key")), 10)
    time.sleep(OPTIONS.check_interval_seconds * 3)

    # then
    assert stack.state(agent.instance_id) == "running"
    assert stack.store.get(record["token_key"]) is not None, "the token was not read"
    runner = next(r for r in stack.gitlab.runners() if r["id"] == record["gitlab_runner_id"])
    assert runner["status"] == "never_contacted"
    assert stack.job(job_id)["status"] == "pending"
    assert stack.agents.stats().hung == 1


def test_an_agent_crashing_mid_job_leaves_the_job_running_and_its_instance_terminated(stack: Stack) -> None:
    """The runner dies while its job runs: the boot script's EXIT trap powers the instance off and shutdown
    behaviour terminate ends it (AWS EC2 user guide, "Change the instance initiated shutdown behavior"); GitLab
    hears nothing more, so the job stays running until GitLab's own stuck-job timeout."""
    # given
    stack.agents.faults.for_next_agent("docker", Fault.CRASH_MID_JOB)
    (job_id,) = stack.pipeline({"name": "build", "tags": ["docker"], "script": ["sleep 5"]})

    # when
    agent = stack.agent_of(job_id)
    assert wait_until(lambda: stack.state(agent.instance_id) == "terminated" and agent.terminated, 10)

    # then
    assert stack.job(job_id)["status"] == "running"
    assert agent.jobs == [(job_id, JobOutcome.ABANDONED)] and agent.ended == "crashed mid-job"
    assert wait_until(lambda: stack.leases("docker") == 0, 10), "the terminated instance gave its lease back"
    assert stack.agents.stats().jobs == {"abandoned": 1}


def test_an_agent_failing_its_job_as_a_system_failure_exits_and_powers_off(stack: Stack) -> None:
    """A runner-side failure (executor, docker) ends the job ``failed`` with ``runner_system_failure``
    (doc/ci/jobs/job_troubleshooting.md failure reasons; lib/api/ci/runner.rb ``failure_reason``); here the
    runner then exits and the instance powers off."""
    # given
    stack.agents.faults.for_next_agent("docker", Fault.RUNNER_SYSTEM_FAILURE)
    (job_id,) = stack.pipeline({"name": "build", "tags": ["docker"], "script": ["sleep 5"]})

    # when
    agent = stack.agent_of(job_id)
    assert wait_until(lambda: stack.job(job_id)["status"] == "failed", 10)
    assert wait_until(lambda: stack.state(agent.instance_id) == "terminated", 10)

    # then
    assert stack.job(job_id)["failure_reason"] == "runner_system_failure"
    assert agent.jobs == [(job_id, JobOutcome.RUNNER_SYSTEM_FAILURE)]


def test_a_fault_set_by_instance_id_reaches_that_instance_only(stack: Stack) -> None:
    """A switch keyed by instance id, set before the instance boots, reaches that instance's agent; the fleet's
    other instances boot normally."""
    # given: an instance launched from the pool's template and tagged as the fleet's, its fault set at once
    instance_id = launch(stack, "docker")
    stack.agents.faults.for_instance(instance_id, Fault.HANG_AT_BOOT)

    # when
    (job_id,) = stack.pipeline({"name": "build", "tags": ["docker"], "script": ["sleep 0.2"]})
    assert wait_until(lambda: stack.job(job_id)["status"] == "success", 20)

    # then (the hung instance's agent boots beside the job's, and on a busy machine reaches its fault later)
    assert wait_until(lambda: getattr(stack.agents.record(instance_id), "phase", None) is Phase.HUNG, 60)
    hung = stack.agents.record(instance_id)
    assert hung is not None and hung.jobs == []
    assert stack.agent_of(job_id).fault is None


def test_a_warm_runner_stays_up_idle_past_the_wait_timeout_while_a_runner_without_a_hand_off_idle_wait_idles_out(
    stack: Stack,
) -> None:
    """A warm runner's token item carries ``idle_wait_seconds`` 0 (docs/token-handoff.md), which wins over the
    options' stand-in for the pool's idle wait: run-single's wait timeout is 0, with which it never stops for
    idleness (gitlab-runner commands/single.go checkFinishedConditions stops only when ``waitTimeout > 0``), and
    reconcile retires it. An item without the attribute leaves the options' wait timeout."""
    from chalicelib import runtime

    # given a warm runner, booted and asking for jobs
    warm = launch(stack, "docker")
    warm_runner = hand_off(stack, "docker", warm, idle_wait_seconds=0)
    assert wait_until(lambda: getattr(stack.agents.record(warm), "phase", None) is Phase.RUNNING, 30)

    # when a runner launched after it, whose item has no idle wait, boots and idles out after the wait timeout
    cold = launch(stack, "docker")
    cold_runner = hand_off(stack, "docker", cold)
    assert wait_until(lambda: getattr(stack.agents.record(cold), "terminated", False), WAIT_TIMEOUT + 30)

    # then the warm runner, asking for jobs since before that one booted, is still up and idle
    idled_out = stack.agents.record(cold)
    assert idled_out is not None and (idled_out.ended, idled_out.jobs) == ("wait timeout", [])
    still_up = stack.agents.record(warm)
    assert still_up is not None and (still_up.phase, still_up.ended, still_up.jobs) == (Phase.RUNNING, "", [])
    assert stack.state(warm) == "running"
    # (the warm runner waits for reconcile; here its operating system shuts it down, and both runners go)
    assert stack.agents.shut_down(warm)
    for runner_id in (warm_runner, cold_runner):
        runtime.gitlab_api().delete_runner(runner_id)


# -- whole pipelines ---------------------------------------------------------------------------------------------


def _fleet_instances(stack: Stack) -> list[dict[str, Any]]:
    """Every instance of the fleet EC2 knows, terminated ones included, once its reads caught up."""
    stack.sandbox.aws.settle()
    pages = stack.ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "tag:runner-fleet:fleet", "Values": [stack.config.fleet]}]
    )
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def _nothing_left(stack: Stack) -> bool:
    instances = _fleet_instances(stack)
    live = [i for i in instances if i["State"]["Name"] != "terminated"]
    leases = sum(stack.leases(pool.name) for pool in stack.config.pools)
    tokens = list(stack.store.scan("token"))
    # GitLab outlives the sandbox's resets: only the runners of this test's instances count
    runners = [r for r in stack.gitlab.runners() if any(i["InstanceId"] in r["description"] for i in instances)]
    return not live and not leases and not runners and not tokens


def test_a_pipeline_of_mixed_tag_jobs_succeeds_and_every_runner_leaves_after_its_idle_wait(stack: Stack) -> None:
    # given jobs for both pools, untagged ones included (the docker pool runs untagged jobs)
    jobs = stack.pipeline(
        {"name": "lint", "tags": ["docker", "linux"], "script": ["sleep 0.3"]},
        {"name": "image", "tags": ["docker", "dind"], "script": ["sleep 0.3"]},
        {"name": "notes", "tags": [], "script": ["sleep 0.3"]},
        {"name": "unit", "tags": ["docker"], "script": ["sleep 0.3"]},
    )

    # when the fleet runs them
    assert wait_until(lambda: all(stack.job(j)["status"] == "success" for j in jobs), 40)

    # then each ran on an instance of the pool its tags ask for
    pools = {
        i["InstanceId"]: {t["Key"]: t["Value"] for t in i["Tags"]}["runner-fleet:pool"] for i in _fleet_instances(stack)
    }
    ran_in = {}
    for job_id in jobs:
        description = stack.job(job_id)["runner"]["description"]
        ran_in[job_id] = next(pool for instance, pool in pools.items() if instance in description)
    assert [ran_in[j] for j in jobs] == ["docker", "build", "docker", "docker"]
    # and once idle for the wait timeout every instance is gone, with its lease, GitLab runner and token
    assert wait_until(lambda: _nothing_left(stack), WAIT_TIMEOUT + 20)
    assert {i["State"]["Name"] for i in _fleet_instances(stack)} == {"terminated"}


def test_a_sequential_pipeline_of_three_stages_of_two_jobs_launches_two_instances(stack: Stack) -> None:
    """The docker pool's runners take 10 builds each: the first stage launches two instances, and the later
    stages' jobs are left to them (idle, with builds left) rather than launched for."""
    # given
    stages = ["one", "two", "three"]
    jobs = stack.pipeline(
        *[
            {"name": f"{stage}-{n}", "stage": stage, "tags": ["docker"], "script": ["sleep 0.3"]}
            for stage in stages
            for n in (1, 2)
        ],
        stages=stages,
    )

    # when
    assert wait_until(lambda: all(stack.job(j)["status"] == "success" for j in jobs), 60)

    # then two instances ran all six jobs
    instances = _fleet_instances(stack)
    assert len(instances) == 2, [i["InstanceId"] for i in instances]
    assert sum(len(r.jobs) for r in stack.agents.records()) == 6
    assert wait_until(lambda: _nothing_left(stack), WAIT_TIMEOUT + 20)
