"""Reconcile against the whole sandbox: moto server, the GitLab emulator, the served webhook, the pump, the agents.

Each scenario breaks the fleet the way the real world does (an instance that hangs at boot, an instance nobody
recorded, a terminated event that never came, a Job Hook GitLab never delivered, a job arriving just as a runner
is retired, a GitLab outage), runs reconcile on a clock moved past the deadline that matters, and checks what a
user would see in GitLab, EC2 and the table. Every scenario ends with the fleet's invariants holding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from chalicelib import runtime
from chalicelib.aws import AwsClients
from chalicelib.lifecycle.facts import FactSource
from chalicelib.lifecycle.invariants import check
from chalicelib.lifecycle.reconcile import Reconciler, RunReport, build_reconciler
from chalicelib.lifecycle.rules import (
    INSTANCE_VISIBILITY_SECONDS,
    LOST_WEBHOOK_SECONDS,
    STALE_LAUNCH_SECONDS,
    Retire,
    decide,
    stuck_after,
)
from chalicelib.naming import FLEET_TAG, LAUNCH_TAG, POOL_TAG, described_instance, launch_template_name
from chalicelib.store import job_key
from fleetctl.sandbox.agents import AgentOptions, AgentRecord, Fault, Phase
from fleetctl.sandbox.local_aws import SANDBOX_REGION
from fleetctl.sandbox.stack import DEFAULT_CONFIG, Sandbox
from tests.faults import WireFaults
from tests.integration.test_runner_agents import Stack, wait_until

pytestmark = [pytest.mark.timeout(240), pytest.mark.scenario]

WAIT_TIMEOUT = 4.0
OPTIONS = AgentOptions(boot_delay_seconds=0.3, wait_timeout_seconds=WAIT_TIMEOUT, check_interval_seconds=0.2)
BOOT_DEADLINE = 60


def stage_config(workdir: Path, name: str = "reconcile-stage.yaml", **docker: Any) -> Path:
    """The shipped stage file, with the shortest boot deadline and no warm pool; ``docker`` overrides fields of
    the docker pool."""
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for pool in document["pools"]:
        pool["boot_deadline_seconds"] = BOOT_DEADLINE
        pool["warm"] = {"size": 0, "windows": []}
        if pool["name"] == "docker":
            pool.update(docker)
    target = workdir / name
    target.write_text(yaml.safe_dump(document))
    return target


@pytest.fixture(scope="module")
def reconcile_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    workdir = tmp_path_factory.mktemp("reconcile")
    stack = Sandbox(config_path=stage_config(workdir), workdir=workdir, agent_options=OPTIONS)
    stack.start()
    yield stack
    stack.stop()


class Fleet(Stack):
    """The sandbox as these tests look at it (GitLab, EC2, the table, the agents), and reconcile on a clock
    ``offset`` seconds ahead."""

    def reconciler(self, offset: float = 0.0) -> Reconciler:
        return build_reconciler(
            self.config, runtime.aws(), runtime.gitlab_api(), runtime.scale_up, clock=lambda: time.time() + offset
        )

    def reconcile(self, offset: float = 0.0) -> RunReport:
        report = self.reconciler(offset).run()
        self.sandbox.pump.drain(timeout=10)
        return report

    def violations(self) -> list[str]:
        source = FactSource(self.config, runtime.store(), self.ec2, runtime.gitlab_api())
        return [str(v) for v in check(source.gather(tokens=True), self.config)]

    def gitlab_runner(self, runner_id: int) -> dict[str, Any] | None:
        found = [r for r in self.gitlab.runners() if int(r["id"]) == runner_id]
        return found[0] if found else None

    def live_instances(self) -> list[str]:
        found = self.ec2.describe_instances(
            Filters=[
                {"Name": f"tag:{FLEET_TAG}", "Values": [self.config.fleet]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ]
        )
        return [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]]

    def quiet(self, timeout: float = 60.0) -> None:
        """Until every runner has idled out and its termination reached the table."""
        assert wait_until(lambda: not self.live_instances(), timeout), self.live_instances()
        self.sandbox.pump.drain(timeout=10)

    def assert_invariants(self) -> None:
        self.quiet()
        assert wait_until(lambda: not self.violations(), 15), self.violations()


@pytest.fixture
def fleet(reconcile_sandbox: Sandbox) -> Iterator[Fleet]:
    reconcile_sandbox.reset(stage_config(reconcile_sandbox.workdir))
    fleet = Fleet(reconcile_sandbox)
    yield fleet
    for job_id in fleet.pipelines_jobs:
        if fleet.job(job_id)["status"] in ("created", "pending", "running"):
            fleet.gitlab.set_job_status(reconcile_sandbox.project_id, job_id, "canceled")


DOCKER_JOB = {"name": "build", "tags": ["docker"], "script": ["sleep 0.3"]}


def test_an_agent_hung_at_boot_is_reaped_after_its_boot_deadline_and_its_job_runs_on_another(fleet: Fleet) -> None:
    """GitLab lists a runner that never contacted it as ``never_contacted`` (doc/api/runners.md, "status");
    past the pool's boot deadline its instance is terminated, its runner and token deleted, its lease given
    back, and the job it was launched for queued again for a launch of its own."""
    # given a job whose instance hangs at boot
    fleet.agents.faults.for_next_agent("docker", Fault.HANG_AT_BOOT)
    (job_id,) = fleet.pipeline(DOCKER_JOB)
    (hung,) = fleet.booted("docker")
    assert wait_until(lambda: hung.phase is Phase.HUNG and "gitlab_runner_id" in fleet.record(hung.instance_id), 20)
    record = fleet.record(hung.instance_id)

    # when reconcile runs before the deadline, and again once the deadline (and the launch's window) passed
    early = fleet.reconcile()
    late = fleet.reconcile(offset=stuck_after(fleet.config) + 1)

    # then only the late run acted: the instance, its runner, token and lease are gone, and the job ran elsewhere
    assert early.metrics == {} and early.stopped == ""
    assert late.metrics["OrphansReaped.NeverContacted"] == 1 and late.metrics["JobsRecovered"] == 1
    assert fleet.state(hung.instance_id) == "terminated"
    assert fleet.gitlab_runner(int(record["gitlab_runner_id"])) is None
    assert fleet.store.get(record["token_key"]) is None
    assert wait_until(lambda: fleet.job(job_id)["status"] == "success", 60)
    assert fleet.agent_of(job_id).instance_id != hung.instance_id
    assert fleet.record(hung.instance_id)["reason"].startswith("reaped: never contacted GitLab")
    fleet.assert_invariants()


def test_an_untracked_instance_tagged_as_the_fleets_is_reaped(fleet: Fleet) -> None:
    """An instance carrying the fleet's tag that no record knows (made by a launch whose record write never
    happened) is terminated once it is older than a launch's staleness window."""
    # given an instance of the docker pool's template, tagged as the fleet's, that the table does not know
    template = launch_template_name(fleet.config.fleet, "docker")
    tags = [
        {"Key": FLEET_TAG, "Value": fleet.config.fleet},
        {"Key": POOL_TAG, "Value": "docker"},
        {"Key": LAUNCH_TAG, "Value": "lost-launch"},
    ]
    [made] = fleet.ec2.run_instances(
        MinCount=1,
        MaxCount=1,
        LaunchTemplate={"LaunchTemplateName": template, "Version": "$Default"},
        SubnetId=fleet.config.pools[0].subnets[0],
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )["Instances"]
    instance_id = made["InstanceId"]
    assert fleet.violations() == [
        f"instance without a record: {instance_id} (running, pool docker)",
        "lease counter differs from live instances: docker (0 leases, 1 live)",
    ]

    # when reconcile runs while it is young, then past the staleness window
    young = fleet.reconcile()
    old = fleet.reconcile(offset=STALE_LAUNCH_SECONDS + 1)

    # then it is terminated only then, and no lease moved
    assert young.metrics == {}
    assert old.metrics == {"OrphansReaped.UntrackedInstance": 1}
    assert fleet.state(instance_id) == "terminated"
    assert fleet.leases("docker") == 0
    fleet.assert_invariants()


def test_a_lost_terminated_event_is_repaired(fleet: Fleet) -> None:
    """EventBridge delivers at least once but may drop an event its target failed on for long: a record whose
    instance is gone is cleaned up as the instance-state handler would have (lease back, runner deleted)."""
    # given a runner that ran its job, whose instance is then terminated with no event reaching the fleet
    (job_id,) = fleet.pipeline(DOCKER_JOB)
    agent = fleet.agent_of(job_id)
    assert wait_until(lambda: fleet.job(job_id)["status"] == "success", 30)
    record = fleet.record(agent.instance_id)
    fleet.ec2.terminate_instances(InstanceIds=[agent.instance_id])
    assert fleet.leases("docker") == 1
    assert f"record without an instance: {agent.instance_id}" in " ".join(fleet.violations())

    # when reconcile runs once EC2's listing can be trusted for it
    report = fleet.reconcile(offset=INSTANCE_VISIBILITY_SECONDS + 1)

    # then the record is terminated, the lease back and the GitLab runner deleted
    assert report.metrics["OrphansReaped.LostInstance"] == 1
    repaired = fleet.record(agent.instance_id)
    assert repaired["state"] == "terminated" and "lease" not in repaired
    assert repaired["reason"] == "reconciled: record whose instance no longer exists"
    assert fleet.leases("docker") == 0
    assert fleet.gitlab_runner(int(record["gitlab_runner_id"])) is None
    fleet.assert_invariants()


def test_lost_pending_webhooks_are_recovered_and_their_jobs_run(fleet: Fleet) -> None:
    """GitLab never redelivers a failed delivery (app/services/web_hook_service.rb): a Job Hook that failed
    before the job was recorded, and one recorded whose queue send failed, both leave a pending job that only
    reconcile's sweep brings to a runner."""
    project_id = fleet.sandbox.project_id
    # given a job whose Job Hooks all failed (the table refused every write), so the fleet never heard of it
    with WireFaults(runtime.aws().dynamodb) as faults:
        faults.fail("UpdateItem", "InternalServerError", status=500)
        (unknown,) = fleet.pipeline({**DOCKER_JOB, "name": "unknown"})
        fleet.gitlab.wait_for_deliveries(timeout=60)
    # and a job recorded as pending whose queue send failed
    with WireFaults(runtime.aws().sqs) as faults:
        faults.fail("SendMessage", "ServiceUnavailable")
        (unqueued,) = fleet.pipeline({**DOCKER_JOB, "name": "unqueued"})
        fleet.gitlab.wait_for_deliveries(timeout=60)
    assert fleet.store.get(job_key(project_id, unknown)) is None
    assert (fleet.store.get(job_key(project_id, unqueued)) or {}).get("queued") is False
    assert fleet.job(unknown)["status"] == fleet.job(unqueued)["status"] == "pending"

    # when reconcile runs once a Job Hook would have arrived
    report = fleet.reconcile(offset=LOST_WEBHOOK_SECONDS + 1)

    # then both are queued, launched and succeed; the table knows them as queued
    assert report.metrics["JobsRecovered"] == 2
    for job_id in (unknown, unqueued):
        assert wait_until(lambda job_id=job_id: fleet.job(job_id)["status"] == "success", 60), fleet.job(job_id)
        assert (fleet.store.get(job_key(project_id, job_id)) or {}).get("queued") is True
    # and a second run finds nothing more to recover
    assert "JobsRecovered" not in fleet.reconcile(offset=LOST_WEBHOOK_SECONDS + 1).metrics
    fleet.assert_invariants()


def idle_runner_past_retirement(fleet: Fleet) -> tuple[AgentRecord, int, float]:
    """A runner that ran a job and is idle: its agent, its GitLab runner, and the clock offset that puts it past
    its retirement point (max lifetime minus the pool's job timeout)."""
    (first,) = fleet.pipeline(DOCKER_JOB)
    agent = fleet.agent_of(first)
    assert wait_until(lambda: fleet.record(agent.instance_id).get("state") == "idle", 30)
    pool = fleet.config.pool("docker")
    age = pool.max_lifetime_minutes * 60 - pool.job_timeout_seconds + 1
    return agent, int(fleet.record(agent.instance_id)["gitlab_runner_id"]), age


def test_a_runner_taking_a_job_between_the_idle_decision_and_its_retirement_is_never_terminated(
    fleet: Fleet,
) -> None:
    """Retiring pauses the runner in GitLab (``PUT /runners/:id`` ``paused``), then lists its running jobs
    (``GET /runners/:id/jobs?status=running``): a paused runner is given no job
    (app/services/ci/register_job_service.rb), so a job it took before the pause shows there, and the runner is
    un-paused and left alone. Without a job in between, the idle runner is deleted and terminated."""
    fleet.agents.options = replace(OPTIONS, wait_timeout_seconds=12.0)
    try:
        # given a runner that ran a job and is idle, past the point where its age retires it
        agent, runner_id, age = idle_runner_past_retirement(fleet)
        reconciler = fleet.reconciler(offset=age)
        facts = reconciler.facts.gather()
        actions = decide(facts, fleet.config)
        assert [(type(a), getattr(a, "instance_id", "")) for a in actions] == [(Retire, agent.instance_id)]

        # when a job reaches it after that decision, before the action
        (second,) = fleet.pipeline(DOCKER_JOB)
        assert wait_until(lambda: fleet.job(second)["status"] == "running", 20)
        assert fleet.job(second)["runner"]["id"] == runner_id
        kept = reconciler.execute(actions, facts)

        # then it is left alone, un-paused, and runs the job to success
        assert kept.skipped == {"Retire": 1} and "RunnersRetired" not in kept.metrics
        assert fleet.state(agent.instance_id) == "running"
        runner = fleet.gitlab_runner(runner_id)
        assert runner is not None and runner["paused"] is False
        assert "draining" not in fleet.record(agent.instance_id)
        assert wait_until(lambda: fleet.job(second)["status"] == "success", 30)

        # and once idle again, the next run retires it: paused, deleted, terminated, its lease back
        assert wait_until(lambda: fleet.record(agent.instance_id).get("state") == "idle", 30)
        retired = fleet.reconcile(offset=age)
        assert retired.metrics == {"RunnersRetired": 1}
        assert fleet.state(agent.instance_id) == "terminated"
        assert fleet.gitlab_runner(runner_id) is None
        assert fleet.leases("docker") == 0
        assert fleet.record(agent.instance_id)["reason"].startswith("retired: past its lifetime")
    finally:
        fleet.agents.options = OPTIONS
    fleet.assert_invariants()


def test_a_runner_given_a_job_after_it_was_marked_draining_is_kept_by_the_recheck(fleet: Fleet) -> None:
    """The narrower window: the runner's record said idle and was marked draining, and GitLab hands it a job
    before the pause lands (its running Job Hook not yet in the table). The re-check after the pause lists
    that job, so the runner is un-paused, the mark cleared, and the job runs to success on it."""
    fleet.agents.options = replace(OPTIONS, wait_timeout_seconds=12.0)
    try:
        # given an idle runner past its retirement point, and a reconcile with a wire of its own to DynamoDB
        agent, runner_id, age = idle_runner_past_retirement(fleet)
        clients = AwsClients(region=SANDBOX_REGION)
        reconciler = build_reconciler(
            fleet.config, clients, runtime.gitlab_api(), runtime.scale_up, clock=lambda: time.time() + age
        )
        second: list[int] = []

        def job_reaches_the_runner(_: dict[str, Any]) -> None:
            # Right after the draining mark landed, before reconcile pauses the runner in GitLab.
            second.extend(fleet.pipeline(DOCKER_JOB))
            assert wait_until(lambda: fleet.job(second[0])["status"] == "running", 20)

        # when reconcile retires it, with the job starting in that window
        with WireFaults(clients.dynamodb) as faults:
            faults.run_after("UpdateItem", job_reaches_the_runner)
            kept = reconciler.run()

        # then the re-check kept it: un-paused, mark cleared, its job succeeds on it, the instance runs on
        assert faults.calls_to("UpdateItem")[0].params["UpdateExpression"].startswith("SET draining")
        assert fleet.job(second[0])["runner"]["id"] == runner_id
        assert kept.skipped == {"Retire": 1} and "RunnersRetired" not in kept.metrics
        runner = fleet.gitlab_runner(runner_id)
        assert runner is not None and runner["paused"] is False
        assert "draining" not in fleet.record(agent.instance_id)
        assert wait_until(lambda: fleet.job(second[0])["status"] == "success", 30)
        assert fleet.state(agent.instance_id) == "running"
    finally:
        fleet.agents.options = OPTIONS
    fleet.assert_invariants()


def test_gitlab_down_for_a_whole_run_leaves_everything_to_the_next_run(fleet: Fleet) -> None:
    """With GitLab answering 503 to everything, the run decides nothing that needs GitLab, stops at the first
    action that calls it, and loses nothing: the next run, with GitLab back, finishes every piece."""
    # given a runner hung at boot past its deadline, and a runner whose terminated event was lost
    fleet.agents.faults.for_next_agent("docker", Fault.HANG_AT_BOOT)
    (stuck,) = fleet.pipeline(DOCKER_JOB)
    (hung,) = fleet.booted("docker")
    assert wait_until(lambda: hung.phase is Phase.HUNG and "gitlab_runner_id" in fleet.record(hung.instance_id), 20)
    hung_runner = int(fleet.record(hung.instance_id)["gitlab_runner_id"])
    (ran,) = fleet.pipeline(DOCKER_JOB)
    agent = fleet.agent_of(ran)
    assert wait_until(lambda: fleet.job(ran)["status"] == "success", 30)
    lost_runner = int(fleet.record(agent.instance_id)["gitlab_runner_id"])
    fleet.ec2.terminate_instances(InstanceIds=[agent.instance_id])

    # when GitLab is down for a whole run
    fleet.gitlab.fail_next("*", ".*", status=503, count=10_000)
    try:
        down = fleet.reconcile(offset=stuck_after(fleet.config) + 1)
    finally:
        fleet.gitlab.clear_faults()
    after_down = fleet.record(agent.instance_id)

    # then the run stopped at GitLab: the lost record is terminated and its lease back (AWS's part), its GitLab
    # runner kept on the record for later; the hung runner, judged only with GitLab, is untouched
    assert down.stopped.startswith("CleanUp failed: gitlab")
    assert after_down["state"] == "terminated" and after_down["gitlab_cleanup"] == "pending"
    assert fleet.state(hung.instance_id) == "running"
    assert fleet.gitlab_runner(lost_runner) is not None

    # and the next run, with GitLab back, finishes everything
    back = fleet.reconcile(offset=stuck_after(fleet.config) + 1)
    assert back.stopped == ""
    assert back.metrics["OrphansReaped.CleanupLeft"] == 1 and back.metrics["OrphansReaped.NeverContacted"] == 1
    assert fleet.gitlab_runner(lost_runner) is None and fleet.gitlab_runner(hung_runner) is None
    assert fleet.state(hung.instance_id) == "terminated"
    assert wait_until(lambda: fleet.job(stuck)["status"] == "success", 60)
    fleet.assert_invariants()


def test_overlapping_runs_do_not_both_act(fleet: Fleet) -> None:
    """Two runs at once (a slow run and the next minute's): the second finds the run lease held and does
    nothing; once the first ends, the lease is free again."""
    first, second = fleet.reconciler(), fleet.reconciler()
    store = runtime.store()
    assert store.take_run_lease("reconcile", "a-run-in-progress", 300)
    try:
        assert second.run().ran is False
    finally:
        store.release_run_lease("reconcile", "a-run-in-progress")
    assert first.run().ran is True
    fleet.assert_invariants()


def test_a_warm_pool_fills_inside_its_window_never_past_max_and_drains_outside_it(fleet: Fleet) -> None:
    """A warm window opens when its ``start`` cron fires and closes when its ``end`` next fires, in its time zone
    (chalicelib/lifecycle/windows.py). Inside it the pool is topped up to its size through the capacity lease,
    so never past max_runners; outside it, idle warm runners are retired."""
    # A window opening at the next full hour and closing two hours later: reconcile runs on a clock moved into
    # it, and past it, by less than the runners' retirement age.
    now = time.time()
    hour = now - now % 3600 + 3600
    opens, closes = time.gmtime(hour).tm_hour, time.gmtime(hour + 2 * 3600).tm_hour
    window = {"start": f"0 {opens} * * *", "end": f"0 {closes} * * *", "timezone": "UTC"}
    inside, outside = hour + 1800 - now, hour + 2 * 3600 + 1800 - now
    warm = stage_config(fleet.sandbox.workdir, "warm-stage.yaml", warm={"size": 3, "windows": [window]}, max_runners=3)
    fleet.sandbox.reset(warm)
    fleet = Fleet(fleet.sandbox)
    try:
        # given one runner busy with a long job, so that the pool has room for two more
        (long_job,) = fleet.pipeline({**DOCKER_JOB, "script": ["sleep 8"]})
        assert wait_until(lambda: fleet.job(long_job)["status"] == "running", 20)
        busy = described_instance(fleet.job(long_job)["runner"]["description"])
        # (the warm runners launched from here on wait a minute for a job, as a real pool's would wait longer)
        fleet.agents.options = replace(OPTIONS, wait_timeout_seconds=60.0)

        # when reconcile runs outside the window, then inside it, twice
        closed = fleet.reconcile(offset=outside)
        opened = fleet.reconcile(offset=inside)
        warm_agents = [a for a in fleet.booted("docker", 3) if a.instance_id != busy]
        assert wait_until(lambda: all(a.runner_id for a in warm_agents), 20)
        again = fleet.reconcile(offset=inside)

        # then nothing outside; inside, two warm runners (max_runners 3, one busy), and no more on the next run
        assert closed.metrics == {}
        assert opened.metrics == {"WarmLaunched": 2}
        assert again.metrics == {}
        assert fleet.leases("docker") == 3 and len(fleet.live_instances()) == 3
        assert all(fleet.record(a.instance_id).get("warm") is True for a in warm_agents)

        # and once the window closes, the idle warm runners are retired; the busy one finishes its job
        drained = fleet.reconcile(offset=outside)
        assert drained.metrics == {"RunnersRetired": 2}
        for agent in warm_agents:
            assert fleet.state(agent.instance_id) == "terminated"
        assert fleet.state(str(busy)) == "running"
        assert fleet.leases("docker") == 1
        assert wait_until(lambda: fleet.job(long_job)["status"] == "success", 30)
    finally:
        fleet.agents.options = OPTIONS
    fleet.assert_invariants()


def test_status_shows_the_invariants_and_fleetctl_reconcile_repairs_them(fleet: Fleet) -> None:
    """``fleetctl status`` checks the invariants against the real resources and names each violation;
    ``fleetctl reconcile --once`` runs reconcile as the schedule does."""
    from click.testing import CliRunner

    from fleetctl.cli import main
    from fleetctl.sandbox.stack import GITLAB_ADMIN_TOKEN

    # given a GitLab runner of the fleet's whose instance never existed
    orphan = runtime.gitlab_api().create_runner(
        description=f"runner-fleet {fleet.config.fleet}/docker i-0123456789abcdef0",
        tags=["docker"],
        run_untagged=False,
        maximum_timeout=3600,
    )
    config = str(fleet.sandbox.workdir / "fleet.json")
    runner = CliRunner()

    def status(*args: str) -> Any:
        return runner.invoke(main, ["status", "--config", config, *args], env={"GITLAB_TOKEN": GITLAB_ADMIN_TOKEN})

    # when the operator looks, reconciles once, and looks again
    before = status("--json")
    shown = status()
    ran = runner.invoke(main, ["reconcile", "--once", "--config", config], catch_exceptions=False)
    after = status("--json")

    # then the violation was named, the run deleted the runner, and the invariants hold
    expected = f"GitLab runner without an instance: {orphan.runner_id} (runner-fleet {fleet.config.fleet}/docker "
    [violation] = yaml.safe_load(before.output)["invariants"]["violations"]
    assert violation.startswith(expected)
    assert "invariants: 1 violated" in shown.output and expected in shown.output
    assert ran.exit_code == 0, ran.output
    assert yaml.safe_load(ran.output.strip().splitlines()[-1])["metrics"] == {"OrphansReaped.GitLabRunner": 1}
    assert fleet.gitlab_runner(orphan.runner_id) is None
    assert yaml.safe_load(after.output)["invariants"] == {"hold": True, "violations": [], "unchecked": []}
    assert "invariants: hold" in status().output


def test_the_sweep_claims_a_job_recorded_as_created_but_never_one_already_queued(fleet: Fleet) -> None:
    """The sweep's claim on the table (moto's DynamoDB): a job recorded as created whose pending Job Hook was
    lost is claimed, and becomes pending and unqueued; one the webhook queued, or one a launch holds, is not."""
    from chalicelib.gitlab_events import JobStatus
    from chalicelib.store import JobEvent

    store = runtime.store()
    project = fleet.sandbox.project_id
    store.record_job_event("d-1", JobEvent(project, 501, JobStatus.CREATED, time.time()))
    store.record_job_event("d-2", JobEvent(project, 502, JobStatus.PENDING, time.time()))
    store.mark_queued(project, 502)

    claim = store.claim_for_sweep(project, 501)
    item = store.get(job_key(project, 501)) or {}
    assert claim is not None and item["queue_claim"] == claim
    assert (item["status"], item["status_rank"], item["queued"], item["live"]) == ("pending", 2, False, "job")
    assert store.claim_for_sweep(project, 501) is None  # claimed a moment ago: its sender may be sending
    assert store.claim_for_sweep(project, 502) is None  # queued by the webhook
    assert store.claim_for_sweep(project, 503) is not None  # never heard of: recorded now, pending
    store.claim_job(project, 503, "L-1")
    store.release_queue_claim(project, 503, str((store.get(job_key(project, 503)) or {})["queue_claim"]))
    assert store.claim_for_sweep(project, 503) is None  # a launch holds it


@pytest.mark.parametrize(
    ("fault", "stopped"),
    [
        ("throttled", "facts unreadable: AWS RequestLimitExceeded"),
        ("timed out", "facts unreadable: AWS ReadTimeoutError"),
    ],
)
def test_a_run_whose_facts_aws_will_not_give_stops_before_acting(fleet: Fleet, fault: str, stopped: str) -> None:
    """EC2 throttling past botocore's retries, or a DescribeInstances whose answers keep timing out: the run
    decides nothing, says why, and gives its run lease back for the next minute's run."""
    # given an instance no record knows, old enough to be reaped
    tags = [{"Key": FLEET_TAG, "Value": fleet.config.fleet}, {"Key": POOL_TAG, "Value": "docker"}]
    [made] = fleet.ec2.run_instances(
        MinCount=1,
        MaxCount=1,
        LaunchTemplate={
            "LaunchTemplateName": launch_template_name(fleet.config.fleet, "docker"),
            "Version": "$Default",
        },
        SubnetId=fleet.config.pools[0].subnets[0],
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )["Instances"]
    clients = AwsClients(region=SANDBOX_REGION)
    reconciler = build_reconciler(
        fleet.config, clients, runtime.gitlab_api(), runtime.scale_up, clock=lambda: time.time() + 600
    )

    # when EC2 will not answer DescribeInstances through any of botocore's attempts
    with WireFaults(clients.ec2) as faults:
        if fault == "throttled":
            faults.fail("DescribeInstances", "RequestLimitExceeded")
        else:
            faults.lose_answer("DescribeInstances", times=100)
        report = reconciler.run()

    # then it stopped before acting, and the next run (EC2 back) acts
    assert report.stopped == stopped and report.metrics == {"ReconcileStopped": 1} and not report.done
    assert fleet.state(made["InstanceId"]) == "running"
    assert reconciler.run().metrics == {"OrphansReaped.UntrackedInstance": 1}
    assert fleet.state(made["InstanceId"]) == "terminated"
    fleet.assert_invariants()
