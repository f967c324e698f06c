"""Idle runners take the next job: the Job Hooks move runner records between busy and idle, and scale-up leaves a
job to an idle runner of its pool for a grace before it launches anything.

Runs on moto server and the GitLab emulator; jobs are moved by GitLab itself (``set_job_status`` with the runner,
which sends the running and finished Job Hooks to the served webhook), as a runner taking them would.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from chalicelib.naming import runner_description
from chalicelib.store import runner_key
from fleetctl.sandbox.stack import GITLAB_OPERATOR_TOKEN, SANDBOX_AWS_LAGS
from tests.faults import WireFaults
from tests.integration.test_scale_up import Fleet


@pytest.fixture
def fleet(fresh_sandbox: Any) -> Fleet:
    return Fleet(fresh_sandbox)


def _launch_one(fleet: Fleet, tags: list[str]) -> tuple[int, str, int]:
    """A job launched for: (job id, its instance, its GitLab runner)."""
    [job_id] = fleet.pipeline(tags)
    before = {i["InstanceId"] for i in fleet.instances()}
    fleet.run()
    [instance] = [i for i in fleet.instances() if i["InstanceId"] not in before]
    pool = instance["tags"]["runner-fleet:pool"]
    description = runner_description(fleet.config.fleet, pool, instance["InstanceId"])
    [runner] = [r for r in fleet.gitlab_runners() if r["description"] == description]
    return job_id, instance["InstanceId"], int(runner["id"])


def _move(fleet: Fleet, job_id: int, status: str, runner_id: int) -> None:
    fleet.gitlab.set_job_status(fleet.sandbox.project_id, job_id, status, runner_id=runner_id)
    fleet.gitlab.wait_for_deliveries(timeout=30)


def _idle(fleet: Fleet, pool: str) -> int:
    """The pool's idle runners, once the idle index (eventually consistent, as every GSI) caught up."""
    fleet.sandbox.aws.settle()
    return int(fleet.runtime.store().capacity.idle_runners(pool, limit=100))


def _idle_runner(fleet: Fleet, tags: list[str]) -> tuple[int, str, int]:
    """A runner that ran a job and has been idle long enough for the idle index to show it."""
    job_id, instance_id, runner_id = _launch_one(fleet, tags)
    _move(fleet, job_id, "running", runner_id)
    _move(fleet, job_id, "success", runner_id)
    fleet.sandbox.aws.settle()
    return job_id, instance_id, runner_id


def test_a_runner_is_busy_while_its_job_runs_and_idle_after_it_with_builds_left(fleet: Fleet) -> None:
    job_id, instance_id, runner_id = _launch_one(fleet, ["docker", "linux"])
    assert fleet.record(runner_key(instance_id))["state"] == "booting"

    _move(fleet, job_id, "running", runner_id)
    record = fleet.record(runner_key(instance_id))
    assert record["state"] == "busy"
    assert _idle(fleet, "docker") == 0

    _move(fleet, job_id, "success", runner_id)
    record = fleet.record(runner_key(instance_id))
    assert (record["state"], record["builds"], record["max_builds"]) == ("idle", 1, 10)
    assert _idle(fleet, "docker") == 1

    # and its termination takes it out of the idle runners
    fleet.instance_terminated(instance_id)
    assert _idle(fleet, "docker") == 0


def test_a_finish_meeting_a_transaction_on_the_runner_record_is_recorded_once_it_ends(fleet: Fleet) -> None:
    """DynamoDB refuses a single-item write on an item a transaction holds (TransactionConflictException; the
    developer guide's "Transaction conflict handling"), and botocore's retry modes do not retry it. The finished
    Job Hook's write to the runner record is tried again, so the runner is idle after its job. Before, the finish
    was logged as RunnerActivityNotRecorded and the record stayed busy: scale-up launched for jobs the idle runner
    was about to take, and reconcile did not count it as a runner on the way."""
    job_id, instance_id, runner_id = _launch_one(fleet, ["docker", "linux"])
    _move(fleet, job_id, "running", runner_id)

    # when the runner's write meets a transaction twice (after the job's own write went through)
    with WireFaults(fleet.runtime.aws().dynamodb) as faults:
        faults.fail("UpdateItem", "TransactionConflictException", times=2, after=1)
        _move(fleet, job_id, "success", runner_id)
        conflicts = faults.attempts("UpdateItem")

    # then it was written on the third attempt: idle, one build done
    record = fleet.record(runner_key(instance_id))
    assert (record["state"], record["builds"]) == ("idle", 1)
    assert _idle(fleet, "docker") == 1
    assert conflicts >= 4  # the job's write, two refused and one accepted of the runner's


def test_a_runner_at_its_last_build_is_done_not_idle(fleet: Fleet) -> None:
    # the build pool is ephemeral: one build per instance
    job_id, instance_id, runner_id = _launch_one(fleet, ["docker", "dind"])
    _move(fleet, job_id, "running", runner_id)
    _move(fleet, job_id, "failed", runner_id)

    assert fleet.record(runner_key(instance_id))["state"] == "done"
    assert _idle(fleet, "build") == 0


def test_a_hook_naming_another_runner_changes_no_record(fleet: Fleet) -> None:
    job_id, instance_id, _ = _launch_one(fleet, ["docker"])
    # another runner of the group (not ours: its description names no instance of ours) takes the job
    other = requests.post(
        f"{fleet.gitlab.url}/api/v4/user/runners",
        headers={"PRIVATE-TOKEN": GITLAB_OPERATOR_TOKEN},
        data={
            "runner_type": "group_type",
            "group_id": fleet.sandbox.group_id,
            "description": "a runner of someone else's",
            "tag_list": "docker",
        },
        timeout=10,
    )
    assert other.status_code == 201, other.text
    _move(fleet, job_id, "running", int(other.json()["id"]))
    _move(fleet, job_id, "success", int(other.json()["id"]))

    record = fleet.record(runner_key(instance_id))
    assert record["state"] == "booting"
    assert "builds" not in record and _idle(fleet, "docker") == 0


def test_a_finish_heard_before_its_start_is_not_undone_by_the_start(fleet: Fleet) -> None:
    # Webhooks arrive in any order: a late "running" must not make an idle runner busy again.
    job_id, instance_id, runner_id = _launch_one(fleet, ["docker"])
    store = fleet.runtime.fleet_store()
    project = fleet.sandbox.project_id

    assert store.runner_finished_job(instance_id, runner_id, project, job_id, at=100.0) is not None
    assert store.runner_started_job(instance_id, runner_id, project, job_id, at=99.0) is None

    record = fleet.record(runner_key(instance_id))
    assert (record["state"], record["builds"]) == ("idle", 1)
    # and the same finish counted twice is one build
    assert store.runner_finished_job(instance_id, runner_id, project, job_id, at=101.0) is None
    assert fleet.record(runner_key(instance_id))["builds"] == 1


def test_a_job_is_left_to_an_idle_runner_and_launches_nothing_when_it_takes_it(fleet: Fleet) -> None:
    # given an idle runner in the docker pool
    _, instance_id, runner_id = _idle_runner(fleet, ["docker"])

    # when another docker job arrives
    [second] = fleet.pipeline(["docker"])
    report = fleet.scale_up().handle_messages(fleet.take_queued(1))

    # then it is deferred, not launched for
    assert report.as_dict() == {"deferred": 1}
    [deferred] = fleet.take_queued(1)
    assert json.loads(deferred)["graced"] is True
    assert len(fleet.instances("docker")) == 1

    # and when the idle runner takes it within the grace, its second turn finds it running: nothing launches
    _move(fleet, second, "running", runner_id)
    assert fleet.scale_up().handle_messages([deferred]).as_dict() == {"not_pending": 1}
    assert len(fleet.instances("docker")) == 1
    assert fleet.record(runner_key(instance_id))["state"] == "busy"


def test_a_job_no_idle_runner_took_launches_after_its_grace(fleet: Fleet) -> None:
    _idle_runner(fleet, ["docker"])

    fleet.pipeline(["docker"])
    assert fleet.scale_up().handle_messages(fleet.take_queued(1)).as_dict() == {"deferred": 1}
    # the idle runner did not take it (gone, or slow): the second turn launches, once
    assert fleet.scale_up().handle_messages(fleet.take_queued(1)).as_dict() == {"launched": 1}
    assert len(fleet.instances("docker")) == 2


def test_only_as_many_jobs_as_idle_runners_wait_the_oldest_first(fleet: Fleet) -> None:
    _idle_runner(fleet, ["docker"])

    jobs = fleet.pipeline(["docker"], ["docker"], ["docker"])
    report = fleet.scale_up().handle_messages(fleet.take_queued(3))

    assert report.as_dict() == {"deferred": 1, "launched": 2}
    [deferred] = [json.loads(b) for b in fleet.take_queued(1)]
    assert deferred["job_id"] == min(jobs)


def test_a_job_arriving_before_the_idle_index_shows_a_new_idle_runner_launches(fleet: Fleet) -> None:
    """The idle index is a GSI, eventually consistent (DynamoDB developer guide, "Read consistency for global
    secondary indexes"): a runner idle for a moment is not counted yet, so a job arriving then is launched for, as
    it would be in AWS. It costs an instance, never a job: the job is launched for, not lost."""
    first, _, runner_id = _launch_one(fleet, ["docker"])
    _move(fleet, first, "running", runner_id)
    fleet.sandbox.aws.shim("dynamodb-index-lag", "set", seconds=30)
    try:
        _move(fleet, first, "success", runner_id)
        fleet.pipeline(["docker"])
        assert fleet.scale_up().handle_messages(fleet.take_queued(1)).as_dict() == {"launched": 1}
    finally:
        fleet.sandbox.aws.shim("dynamodb-index-lag", "set", **SANDBOX_AWS_LAGS["dynamodb-index-lag"])


def test_job_start_latency_is_measured_per_pool(fleet: Fleet, capfd: pytest.CaptureFixture[str]) -> None:
    job_id, _, runner_id = _launch_one(fleet, ["docker"])
    capfd.readouterr()

    _move(fleet, job_id, "running", runner_id)

    documents = [json.loads(line) for line in capfd.readouterr().out.splitlines() if '"_aws"' in line]
    measured = {
        metric["Name"]: document
        for document in documents
        for directive in document["_aws"]["CloudWatchMetrics"]
        for metric in directive["Metrics"]
    }
    assert set(measured) >= {"QueueWaitSeconds", "BootSeconds"}
    for name in ("QueueWaitSeconds", "BootSeconds"):
        document = measured[name]
        assert document["pool"] == "docker"
        assert document["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["service", "pool"]]
        assert document["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"] == "Seconds"
        # EMF takes a value or an array of values; Powertools writes an array
        [value] = document[name] if isinstance(document[name], list) else [document[name]]
        assert 0 <= value < 60


def test_an_idle_index_still_being_built_launches_as_before(fleet: Fleet) -> None:
    """DynamoDB refuses reads of a global secondary index while it backfills after UpdateTable added it, with a
    ValidationException "Cannot read from backfilling global secondary index" (Developer Guide, "Adding a global
    secondary index to an existing table"; aws/aws-cli#4845). A fleet upgraded by bootstrap meets it until the
    index is ACTIVE: its jobs must launch as they did before idle runners were counted, not fail."""
    from chalicelib.scaling.policy import RetryPolicy
    from chalicelib.scaling.scale_up import build_scale_up

    first, _, runner_id = _launch_one(fleet, ["docker"])
    _move(fleet, first, "running", runner_id)
    _move(fleet, first, "success", runner_id)
    fleet.pipeline(["docker"])

    aws = fleet.runtime.aws()
    with WireFaults(aws.dynamodb) as faults:
        faults.fail("Query", "ValidationException", "Cannot read from backfilling global secondary index: idle-runners")
        scale_up = build_scale_up(fleet.config, aws, fleet.runtime.gitlab_api(), policy=RetryPolicy(base_delay=1))
        report = scale_up.handle_messages(fleet.take_queued(1))

    assert faults.attempts("Query") == 1  # a ValidationException is not retried by botocore
    assert report.as_dict() == {"launched": 1}
    assert len(fleet.instances("docker")) == 2
