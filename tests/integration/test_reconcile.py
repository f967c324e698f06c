"""Reconcile against the whole sandbox: moto server, the GitLab emulator, the served webhook, the pump, the agents.

Each scenario breaks the fleet the way the real world does (an instance that hangs at boot, an instance nobody
recorded, a terminated event that never came, a Job Hook GitLab never delivered, a job arriving just as a runner
is retired, a GitLab outage), runs reconcile on a clock moved past the deadline that matters, and checks what a
user would see in GitLab, EC2 and the table. Every scenario ends with the fleet's invariants holding.
"""

from __future__ import annotations

import json
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
    RETIRE_GRACE_SECONDS,
    RUNNER_GRACE_SECONDS,
    STALE_LAUNCH_SECONDS,
    TAKEN_LAUNCH_SECONDS,
    stuck_after,
)
from chalicelib.naming import FLEET_TAG, LAUNCH_TAG, POOL_TAG, FleetOwner, described_instance, launch_template_name
from chalicelib.scaling.tokens import RunnerTokens
from chalicelib.store import job_key, token_key
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
        # A run on a clock moved ahead stands for a run that much later, when AWS's lagging reads (EC2's listing,
        # the table's index) have long caught up with what the test just did.
        self.sandbox.aws.settle()
        report = self.reconciler(offset).run()
        self.sandbox.pump.drain(timeout=10)
        return report

    def owner_note(self, made_at: float) -> str:
        """The maintenance note this fleet writes on a GitLab runner it made at ``made_at``."""
        aws = runtime.aws()
        return FleetOwner(self.config.fleet, self.config.state.table, lambda: aws.client("sts")).note(made_at)

    def violations(self) -> list[str]:
        self.sandbox.aws.settle()
        source = FactSource(self.config, runtime.store(), self.ec2, runtime.gitlab_api())
        return [str(v) for v in check(source.gather(tokens=True), self.config)]

    def gitlab_runner(self, runner_id: int) -> dict[str, Any] | None:
        found = [r for r in self.gitlab.runners() if int(r["id"]) == runner_id]
        return found[0] if found else None

    def live_instances(self) -> list[str]:
        self.sandbox.aws.settle()
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
        self.sandbox.aws.settle()
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


DIND_JOB = {"name": "image", "tags": ["docker", "dind"], "script": ["sleep 0.3"]}


def test_a_job_whose_runner_took_another_pools_job_is_launched_for_again_a_minute_after_its_claim(
    fleet: Fleet,
) -> None:
    """GitLab hands a runner the oldest pending job its tags allow, so a build runner (docker, dind) launched for
    an image job takes an older job tagged docker alone, and no runner is coming for the image job: the docker
    pool's runners cannot run it. Reconcile launches for it again once its claim is a minute old and its pool has
    no runner booting or idle. Before, it waited until past the boot deadline and the launch window (twelve
    minutes with dev.yaml's deadline)."""
    # given a docker job and then an image job, the docker pool's runner hanging at boot, so that the build
    # runner is the first to ask GitLab for a job
    fleet.agents.faults.for_next_agent("docker", Fault.HANG_AT_BOOT)
    docker_job, image_job = fleet.pipeline(DOCKER_JOB, DIND_JOB)
    assert wait_until(lambda: fleet.job(docker_job)["status"] == "success", 30)
    assert fleet.agent_of(docker_job).pool == "build"
    assert fleet.job(image_job)["status"] == "pending"

    # when reconcile runs a moment later, and then a minute after the claim (long before the boot deadline)
    early = fleet.reconcile()
    later = fleet.reconcile(offset=TAKEN_LAUNCH_SECONDS + 1)

    # then only the later run launched for the image job again, and it ran on a build runner of its own
    assert "JobsRecovered" not in early.metrics
    assert later.metrics["JobsRecovered"] == 1
    assert stuck_after(fleet.config) > TAKEN_LAUNCH_SECONDS + 1
    assert wait_until(lambda: fleet.job(image_job)["status"] == "success", 60)
    assert fleet.agent_of(image_job).pool == "build"
    fleet.reconcile(offset=stuck_after(fleet.config) + 1)  # the hung docker runner, past its boot deadline
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
    fleet.sandbox.aws.shim("ec2-state-events", "lose", instance_ids=[agent.instance_id])
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


def test_a_busy_runner_past_its_retirement_point_finishes_its_job_takes_no_other_and_is_then_retired(
    fleet: Fleet,
) -> None:
    """Past its retirement point a runner is paused even while busy (``PUT /runners/:id`` ``paused``): it finishes
    the job it runs, GitLab gives it no other (app/services/ci/register_job_service.rb), and a run after the
    grace deletes and terminates it. Before, only idle runners were retired: a busy one kept taking jobs until
    its lifetime's power-off killed whatever it ran."""
    fleet.agents.options = replace(OPTIONS, wait_timeout_seconds=20.0)
    try:
        # given a runner busy with a long job, past its retirement point
        (long_job,) = fleet.pipeline({**DOCKER_JOB, "script": ["sleep 4"]})
        assert wait_until(lambda: fleet.job(long_job)["status"] == "running", 20)
        runner_id = int(fleet.job(long_job)["runner"]["id"])
        instance_id = str(described_instance(fleet.job(long_job)["runner"]["description"]))
        pool = fleet.config.pool("docker")
        age = pool.max_lifetime_minutes * 60 - pool.job_timeout_seconds + 1

        # when reconcile runs, and another job comes while the long one runs
        paused = fleet.reconcile(offset=age)
        (next_job,) = fleet.pipeline(DOCKER_JOB)

        # then the busy runner was paused, not retired: its job succeeds, and the next job runs elsewhere
        assert paused.metrics == {"RunnersPaused": 1}
        assert (fleet.gitlab_runner(runner_id) or {}).get("paused") is True
        assert fleet.record(instance_id)["draining"].startswith("retiring: past its lifetime")
        assert wait_until(lambda: fleet.job(long_job)["status"] == "success", 30)
        assert wait_until(lambda: fleet.job(next_job)["status"] == "success", 30)
        assert int(fleet.job(next_job)["runner"]["id"]) != runner_id
        assert fleet.state(instance_id) == "running"

        # and once idle and past the grace, the next run retires it: deleted, terminated, its lease back
        assert wait_until(lambda: fleet.record(instance_id).get("state") == "idle", 30)
        retired = fleet.reconcile(offset=age + RETIRE_GRACE_SECONDS + 1)
        assert retired.metrics["RunnersRetired"] == 1
        assert fleet.state(instance_id) == "terminated"
        assert fleet.gitlab_runner(runner_id) is None
        assert fleet.record(instance_id)["reason"].startswith("retired: past its lifetime")
    finally:
        fleet.agents.options = OPTIONS
    fleet.assert_invariants()


def test_a_job_request_past_gitlabs_active_check_when_the_pause_lands_never_loses_its_job(fleet: Fleet) -> None:
    """GitLab checks that a runner is active once, at the start of ``POST /jobs/request`` (lib/api/ci/runner.rb),
    and picks and assigns a job afterwards (Ci::RegisterJobService). A request between the two when the pause
    lands still gets a job. Staged: the runner's request is held past the check, reconcile pauses the runner, a
    job becomes pending, and the request goes on and takes it. Retiring in the same run as the pause listed no
    running job and deleted the runner that was about to run one; after the grace, the listing shows the job, the
    runner is left to finish it, and only a run after that retires it."""
    hold = None
    fleet.sandbox.reset(stage_config(fleet.sandbox.workdir, "one-runner.yaml", max_runners=1))
    fleet = Fleet(fleet.sandbox)
    fleet.agents.options = replace(OPTIONS, wait_timeout_seconds=20.0)
    try:
        # given an idle runner past its retirement point (the pool's only one, so a new job launches no other),
        # and a new job its next request is for, held between GitLab's checks and the assignment
        agent, runner_id, age = idle_runner_past_retirement(fleet)
        hold = fleet.sandbox.gitlab.hold_job_request(runner_id)
        (late,) = fleet.pipeline({**DOCKER_JOB, "script": ["sleep 4"]})
        assert hold.reached.wait(10)

        # when reconcile pauses it, and then the request goes on
        paused = fleet.reconcile(offset=age)
        assert (fleet.gitlab_runner(runner_id) or {}).get("paused") is True
        hold.release()

        # then the paused runner runs the job, and a run past the grace leaves it alone while it does
        assert paused.metrics == {"RunnersPaused": 1}
        assert wait_until(lambda: fleet.job(late)["status"] == "running", 20)
        assert int(fleet.job(late)["runner"]["id"]) == runner_id
        waiting = fleet.reconcile(offset=age + RETIRE_GRACE_SECONDS + 1)
        assert "RunnersRetired" not in waiting.metrics and not waiting.done
        assert fleet.gitlab_runner(runner_id) is not None
        assert wait_until(lambda: fleet.job(late)["status"] == "success", 30)

        # and once it ran the job, the next run retires it
        assert wait_until(lambda: fleet.record(agent.instance_id).get("state") == "idle", 30)
        retired = fleet.reconcile(offset=age + RETIRE_GRACE_SECONDS + 1)
        assert retired.metrics == {"RunnersRetired": 1}
        assert fleet.state(agent.instance_id) == "terminated"
        assert fleet.gitlab_runner(runner_id) is None
        assert fleet.leases("docker") == 0
    finally:
        if hold is not None:
            hold.release()
        fleet.agents.options = OPTIONS
    fleet.assert_invariants()


def test_a_retirement_stopped_half_way_is_finished_by_the_next_run(fleet: Fleet) -> None:
    """A paused runner GitLab has heard from reports ``paused``, not ``online``: the retirement it belongs to is
    finished all the same. A run stopped after the retiring mark (GitLab failing the pause) pauses again; one
    stopped after the GitLab runner was deleted (EC2 throttling the termination) terminates the instance."""
    fleet.agents.options = replace(OPTIONS, wait_timeout_seconds=30.0)
    try:
        # given an idle runner past its retirement point, whose pause GitLab fails
        agent, runner_id, age = idle_runner_past_retirement(fleet)
        fleet.gitlab.fail_next("PUT", rf"/runners/{runner_id}", status=503, count=10)
        try:
            unpaused = fleet.reconcile(offset=age)
        finally:
            fleet.gitlab.clear_faults()
        assert unpaused.stopped.startswith("Pause failed: gitlab")
        assert fleet.record(agent.instance_id)["draining"].startswith("retiring: ")
        assert (fleet.gitlab_runner(runner_id) or {}).get("paused") is False

        # when the next run pauses it, and the run after the grace has its termination throttled
        again = fleet.reconcile(offset=age)
        assert again.metrics == {"RunnersPaused": 1}
        assert (fleet.gitlab_runner(runner_id) or {}).get("status") == "paused"
        clients = AwsClients(region=SANDBOX_REGION)
        throttled = build_reconciler(
            fleet.config,
            clients,
            runtime.gitlab_api(),
            runtime.scale_up,
            clock=lambda: time.time() + age + RETIRE_GRACE_SECONDS + 1,
        )
        with WireFaults(clients.ec2) as faults:
            faults.fail("TerminateInstances", "RequestLimitExceeded")
            stopped = throttled.run()
        assert stopped.stopped == "Retire failed: AWS RequestLimitExceeded"
        assert fleet.gitlab_runner(runner_id) is None and fleet.state(agent.instance_id) == "running"

        # then the next run finishes it: the instance terminated, the record and lease settled
        finished = fleet.reconcile(offset=age + RETIRE_GRACE_SECONDS + 1)
        assert finished.metrics["RunnersRetired"] == 1
        assert fleet.state(agent.instance_id) == "terminated"
        assert fleet.record(agent.instance_id)["state"] == "terminated" and fleet.leases("docker") == 0
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
    fleet.sandbox.aws.shim("ec2-state-events", "lose", instance_ids=[agent.instance_id])
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
    # given one runner busy with a long job, so that the pool has room for two more
    (long_job,) = fleet.pipeline({**DOCKER_JOB, "script": ["sleep 8"]})
    assert wait_until(lambda: fleet.job(long_job)["status"] == "running", 20)
    busy = described_instance(fleet.job(long_job)["runner"]["description"])

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
    assert drained.metrics == {"RunnersPaused": 2}
    retired = fleet.reconcile(offset=outside + RETIRE_GRACE_SECONDS + 1)
    assert retired.metrics == {"RunnersRetired": 2}
    for agent in warm_agents:
        assert fleet.state(agent.instance_id) == "terminated"
    assert fleet.state(str(busy)) == "running"
    assert fleet.leases("docker") == 1
    assert wait_until(lambda: fleet.job(long_job)["status"] == "success", 30)
    fleet.assert_invariants()


def test_a_warm_runner_outlives_the_idle_wait_and_a_burst_leaves_no_surplus(fleet: Fleet) -> None:
    """A warm runner's token item tells its instance not to stop for idleness, so the pool keeps it rather than
    launching another each time it would have idled out; a warm runner launched while the others were busy is
    retired once idle longer than the pool's idle wait, leaving the warm size. Before, every warm runner powered
    off after the idle wait and the next run launched a new one."""
    now = time.time()
    hour = now - now % 3600 + 3600
    opens, closes = time.gmtime(hour).tm_hour, time.gmtime(hour + 2 * 3600).tm_hour
    window = {"start": f"0 {opens} * * *", "end": f"0 {closes} * * *", "timezone": "UTC"}
    inside, outside = hour + 60 - now, hour + 2 * 3600 + 1800 - now
    idle_wait = 600  # the docker pool's, in dev.yaml
    config = stage_config(fleet.sandbox.workdir, "warm-one.yaml", warm={"size": 1, "windows": [window]})
    fleet.sandbox.reset(config)
    fleet = Fleet(fleet.sandbox)

    # given a pool kept warm, its warm runner idle for three times the agents' idle wait
    assert fleet.reconcile(offset=inside).metrics == {"WarmLaunched": 1}
    (first,) = fleet.booted("docker", 1)
    assert wait_until(lambda: first.runner_id is not None, 20)
    time.sleep(3 * WAIT_TIMEOUT)

    # then it is still running, and the next run launches nothing
    assert fleet.state(first.instance_id) == "running" and not first.terminated
    assert fleet.reconcile(offset=inside).metrics == {}

    # when it takes a job, the next run launches a warm runner in its place, and the job ends
    (job_id,) = fleet.pipeline({**DOCKER_JOB, "script": ["sleep 15"]})
    assert wait_until(lambda: fleet.job(job_id)["status"] == "running", 20)
    assert wait_until(lambda: fleet.record(first.instance_id).get("state") == "busy", 20)  # its Job Hook came
    assert fleet.reconcile(offset=inside).metrics == {"WarmLaunched": 1}
    assert wait_until(lambda: fleet.job(job_id)["status"] == "success", 30)
    assert fleet.agent_of(job_id).instance_id == first.instance_id
    second = next(a for a in fleet.booted("docker", 2) if a.instance_id != first.instance_id)
    assert wait_until(lambda: second.runner_id is not None, 20)

    # then once both are idle past the idle wait, the one idle longer is retired and the other kept
    assert fleet.reconcile(offset=inside + idle_wait + 1).metrics == {"RunnersPaused": 1}
    retired = fleet.reconcile(offset=inside + idle_wait + RETIRE_GRACE_SECONDS + 2)
    assert retired.metrics == {"RunnersRetired": 1}
    assert fleet.state(second.instance_id) == "terminated"
    assert fleet.state(first.instance_id) == "running"
    assert fleet.record(second.instance_id)["reason"].endswith(
        "beyond the pool's warm size, and idle longer than its idle wait"
    )

    # and the window's close retires the last one
    assert fleet.reconcile(offset=outside).metrics == {"RunnersPaused": 1}
    assert fleet.reconcile(offset=outside + RETIRE_GRACE_SECONDS + 1).metrics == {"RunnersRetired": 1}
    fleet.assert_invariants()


def test_status_shows_the_invariants_and_fleetctl_reconcile_repairs_them(fleet: Fleet) -> None:
    """``fleetctl status`` checks the invariants against the real resources and names each violation;
    ``fleetctl reconcile --once`` runs reconcile as the schedule does."""
    from click.testing import CliRunner

    from fleetctl.cli import main
    from fleetctl.sandbox.stack import GITLAB_ADMIN_TOKEN

    # given a GitLab runner of the fleet's (its description and its maintenance note) whose instance never existed
    orphan = runtime.gitlab_api().create_runner(
        description=f"runner-fleet {fleet.config.fleet}/docker i-0123456789abcdef0",
        tags=["docker"],
        run_untagged=False,
        maximum_timeout=3600,
        maintenance_note=fleet.owner_note(time.time() - 3600),
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
    assert "invariants: ok" in status().output


def test_the_sweep_claims_a_job_recorded_as_created_but_never_one_already_queued(fleet: Fleet) -> None:
    """The sweep's claim on the table (moto's DynamoDB): a job recorded as created whose pending Job Hook was
    lost is claimed, and becomes pending and unqueued; one the webhook queued, or one a launch holds, is not."""
    from chalicelib.intake.job_hooks import JobStatus
    from chalicelib.store import JobEvent

    store = runtime.store()
    project = fleet.sandbox.project_id
    store.record_job_event("d-1", JobEvent(project, 501, JobStatus.CREATED, time.time()))
    store.record_job_event("d-2", JobEvent(project, 502, JobStatus.PENDING, time.time()))
    store.mark_queued(project, 502)

    claim = store.claims.claim_for_sweep(project, 501)
    item = store.get(job_key(project, 501)) or {}
    assert claim is not None and item["queue_claim"] == claim
    assert (item["status"], item["status_rank"], item["queued"], item["live"]) == ("pending", 2, False, "job")
    assert store.claims.claim_for_sweep(project, 501) is None  # claimed a moment ago: its sender may be sending
    assert store.claims.claim_for_sweep(project, 502) is None  # queued by the webhook
    assert store.claims.claim_for_sweep(project, 503) is not None  # never heard of: recorded now, pending
    store.claims.claim_job(project, 503, "L-1", "docker")
    store.release_queue_claim(project, 503, str((store.get(job_key(project, 503)) or {})["queue_claim"]))
    assert store.claims.claim_for_sweep(project, 503) is None  # a launch holds it


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


def test_a_relaunch_whose_send_failed_is_queued_again_by_the_next_run(fleet: Fleet) -> None:
    """Reconcile gives a job stuck after its launch to a new launch: it releases the old launch's claim and marks
    the job unqueued under its own queue claim, then sends. When SQS refuses the send, the claim goes back and the
    job is left unqueued, which the next run queues. Before, the job stayed ``queued`` with no launch, and no rule
    ever looked at it again."""
    # given a job whose runner hung at boot, past the point where its job is launched for again
    fleet.agents.faults.for_next_agent("docker", Fault.HANG_AT_BOOT)
    (job_id,) = fleet.pipeline(DOCKER_JOB)
    (hung,) = fleet.booted("docker")
    assert wait_until(lambda: hung.phase is Phase.HUNG and "gitlab_runner_id" in fleet.record(hung.instance_id), 20)
    late = stuck_after(fleet.config) + 1
    clients = AwsClients(region=SANDBOX_REGION)
    reconciler = build_reconciler(
        fleet.config, clients, runtime.gitlab_api(), runtime.scale_up, clock=lambda: time.time() + late
    )

    # when the run's send to the jobs queue fails
    fleet.sandbox.aws.settle()
    with WireFaults(clients.sqs) as faults:
        faults.fail("SendMessage", "ServiceUnavailable")
        failed = reconciler.run()

    # then the run stopped there, and the job is pending, unqueued, launched by nobody
    assert failed.stopped == "RecoverJob failed: AWS ServiceUnavailable"
    item = fleet.store.get(job_key(fleet.sandbox.project_id, job_id)) or {}
    assert item["queued"] is False and "launch_id" not in item
    # and the next run queues it, and it runs
    again = fleet.reconcile(offset=late)
    assert again.metrics["JobsRecovered"] == 1
    assert wait_until(lambda: fleet.job(job_id)["status"] == "success", 60)
    fleet.assert_invariants()


def test_only_this_fleets_runners_made_long_enough_ago_are_reaped_as_orphans(fleet: Fleet) -> None:
    """A GitLab runner named like one of this fleet's, with no instance, is deleted only when its maintenance note
    is this fleet's mark (fleet, account, region, table) and says it was made more than the grace ago. A
    same-named fleet of another account on the same group keeps its runners; one scale-up is still making is
    never judged. Before, the description alone decided, with no grace."""
    api = runtime.gitlab_api()
    now = time.time()
    other_note = fleet.owner_note(now - 3600).replace("account 123456789012", "account 210987654321")

    def runner(instance_id: str, note: str) -> int:
        return api.create_runner(
            description=f"runner-fleet {fleet.config.fleet}/docker {instance_id}",
            tags=["docker"],
            run_untagged=False,
            maximum_timeout=3600,
            maintenance_note=note,
        ).runner_id

    # given four runners named as this fleet's, none with an instance
    others = runner("i-0000000000000000a", other_note)  # another account's fleet of the same name
    unmarked = runner("i-0000000000000000b", "")  # nobody's mark
    young = runner("i-0000000000000000c", fleet.owner_note(now))  # ours, made a moment ago
    old = runner("i-0000000000000000d", fleet.owner_note(now - 3600))  # ours, made an hour ago

    # when reconcile runs now, and again once the grace passed
    first = fleet.reconcile()
    later = fleet.reconcile(offset=RUNNER_GRACE_SECONDS + 1)

    # then only this fleet's runners went, each once it was old enough; the others are left alone
    assert first.metrics == {"OrphansReaped.GitLabRunner": 1} and fleet.gitlab_runner(old) is None
    assert later.metrics == {"OrphansReaped.GitLabRunner": 1} and fleet.gitlab_runner(young) is None
    assert fleet.gitlab_runner(others) is not None and fleet.gitlab_runner(unmarked) is not None
    for runner_id in (others, unmarked):
        api.delete_runner(runner_id)
    fleet.assert_invariants()


def test_a_token_past_its_boot_deadline_is_deleted_by_the_next_run_without_a_scan(fleet: Fleet) -> None:
    """A runner token whose instance never read it by its boot deadline (the instance is gone, or never was) is
    found through the keys-only ``token-deadlines`` index and deleted by the next run, not left to DynamoDB's TTL
    (which deletes within days). Before, ``fleetctl status`` reported it and nothing removed it."""
    # given a token item past its deadline for an instance that does not exist
    key = token_key(f"AROAEXAMPLEROLEID:{'i-0123456789abcdef9'}")
    RunnerTokens(runtime.aws().dynamodb, fleet.config.state.table).put(
        key, "i-0123456789abcdef9", "glrt-" + "t" * 20, time.time() - 60
    )
    assert "token past its boot deadline: i-0123456789abcdef9" in " ".join(fleet.violations())
    clients = AwsClients(region=SANDBOX_REGION)
    reconciler = build_reconciler(fleet.config, clients, runtime.gitlab_api(), runtime.scale_up)

    # when reconcile runs
    fleet.sandbox.aws.settle()
    with WireFaults(clients.dynamodb) as faults:
        report = reconciler.run()

    # then the token is gone, read through the index, with no scan of the table
    assert report.metrics == {"OrphansReaped.Token": 1}
    assert fleet.store.get(key) is None
    assert faults.calls_to("Scan") == []
    assert any(c.params.get("IndexName") == "token-deadlines" for c in faults.calls_to("Query"))
    fleet.assert_invariants()


def _launch_query(call_params: dict[str, Any]) -> bool:
    """Whether a Query reads the live launch records (the index, by kind)."""
    return "launch" in json.dumps(call_params.get("ExpressionAttributeValues", {}))


def test_a_launch_landing_between_reconciles_reads_is_no_lease_violation(fleet: Fleet) -> None:
    """The lease counter, the runner records and the launches are three index queries, not a snapshot: a launch
    taking a lease after the launches were read and before the counter was makes them differ for a moment.
    Reconcile reports a difference only when a second reading finds it again, so a busy fleet raises no false
    ``InvariantViolations``."""
    store = runtime.store()
    launch_id = f"between-reads-{time.time_ns()}"
    with WireFaults(runtime.aws().dynamodb) as faults:
        taken: list[int] = []

        def launch_lands(_: dict[str, Any]) -> None:
            queries = faults.calls_to("Query")
            if not taken and queries and _launch_query(queries[-1].params):
                taken.append(store.capacity.acquire_leases("docker", 1, 5, launch_id))
                fleet.sandbox.aws.settle()  # the counter's index has the launch before reconcile reads it

        faults.run_after("Query", launch_lands, times=None)
        report = fleet.reconciler().run()
    try:
        assert taken == [1]
        assert [v for v in report.violations if "lease counter differs from the leases held" in v] == []
    finally:
        store.capacity.give_back_launch_leases(launch_id, "docker", 1, 1, finished=True, reason="test over")
    fleet.assert_invariants()


def test_a_lease_nobody_holds_is_reported_by_every_run(fleet: Fleet) -> None:
    """A lease the pool counter counts and no record or launch holds is a leak: the second reading finds the same
    difference, and the run logs it and counts ``InvariantViolations``."""
    from chalicelib.store import LIVE_ATTRIBUTE, pool_key

    before = fleet.leases("docker")
    table = runtime.aws().dynamodb
    key = {"pk": {"S": pool_key("docker")}}
    table.update_item(
        TableName=fleet.config.state.table,
        Key=key,
        UpdateExpression="SET kind = :kind, #name = :name, #live = :kind ADD leases :one",
        ExpressionAttributeNames={"#name": "name", "#live": LIVE_ATTRIBUTE},
        ExpressionAttributeValues={":one": {"N": "1"}, ":kind": {"S": "pool"}, ":name": {"S": "docker"}},
    )
    try:
        fleet.sandbox.aws.settle()
        report = fleet.reconciler().run()
        assert (
            f"lease counter differs from the leases held: docker ({before + 1} leases, {before} held by records "
            "and launches)" in report.violations
        )
        assert report.metrics.get("InvariantViolations", 0) >= 1
    finally:
        table.update_item(
            TableName=fleet.config.state.table,
            Key=key,
            UpdateExpression="ADD leases :minus",
            ExpressionAttributeValues={":minus": {"N": "-1"}},
        )
    fleet.assert_invariants()
