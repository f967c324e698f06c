"""The interruption handler and the retry of a lost job, step by step, under GitLab failures and races.

Runs on moto server and the GitLab emulator with the served webhook; jobs are moved by GitLab itself
(``set_job_status`` with the runner, which sends the Job Hooks), and the handlers are driven one event at a time.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from chalicelib.errors import RetryableError
from chalicelib.lifecycle.interruptions import parse_interruption
from chalicelib.naming import runner_description
from chalicelib.store import runner_key
from fleetctl.sandbox.ec2_events import (
    interruption_warning_entry,
    rebalance_recommendation_entry,
    terminate_instances,
)
from tests.integration.test_runner_reuse import _launch_one, _move
from tests.integration.test_scale_up import Fleet


@pytest.fixture
def fleet(fresh_sandbox: Any) -> Fleet:
    return Fleet(fresh_sandbox)


def _event(entry: dict[str, Any]) -> dict[str, Any]:
    """A PutEvents entry as EventBridge delivers it to a target."""
    return {
        "version": "0",
        "id": "0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f9",
        "detail-type": entry["DetailType"],
        "source": entry["Source"],
        "account": "123456789012",
        "time": "2026-11-29T14:02:11Z",
        "region": "us-east-1",
        "resources": entry["Resources"],
        "detail": json.loads(entry["Detail"]),
    }


def _warn(fleet: Fleet, instance_id: str) -> str:
    handler = fleet.runtime.interruptions()
    return str(handler.handle(parse_interruption(_event(interruption_warning_entry(instance_id, "us-east-1")))))


def _paused(fleet: Fleet, runner_id: int) -> bool:
    return bool(next(r for r in fleet.gitlab.runners() if r["id"] == runner_id)["paused"])


def _tries(fleet: Fleet, job_id: int) -> list[dict[str, Any]]:
    pipeline_id = int(fleet.gitlab.job(fleet.sandbox.project_id, job_id)["pipeline"]["id"])
    return list(fleet.gitlab.jobs_of_pipeline(fleet.sandbox.project_id, pipeline_id))


def _lost(fleet: Fleet) -> tuple[int, str, int]:
    """A job running on a runner EC2 warned about, which then fails it as gitlab-runner does at the shutdown."""
    job_id, instance_id, runner_id = _launch_one(fleet, ["docker"])
    _move(fleet, job_id, "running", runner_id)
    assert _warn(fleet, instance_id) == "handled"
    fleet.gitlab.set_job_status(
        fleet.sandbox.project_id, job_id, "failed", failure_reason="runner_system_failure", runner_id=runner_id
    )
    fleet.gitlab.wait_for_deliveries(timeout=30)
    return job_id, instance_id, runner_id


def test_a_gitlab_failure_while_pausing_raises_and_the_retried_event_pauses(fleet: Fleet) -> None:
    """The record is marked first: GitLab answering 5xx to ``PUT /runners/:id`` fails the invocation, which
    EventBridge retries (Lambda's asynchronous invocation); the retry finds the mark and pauses the runner."""
    # given a runner running a job
    job_id, instance_id, runner_id = _launch_one(fleet, ["docker"])
    _move(fleet, job_id, "running", runner_id)

    # when its interruption warning meets GitLab failing
    fleet.gitlab.fail_next("PUT", r"/runners/\d+", status=502)
    with pytest.raises(RetryableError):
        _warn(fleet, instance_id)

    # then it is marked but not yet paused, and the retried event pauses it without a second mark
    record = fleet.record(runner_key(instance_id))
    assert record["draining"] == "spot interruption warning" and "idle_pool" not in record
    assert not _paused(fleet, runner_id)
    assert _warn(fleet, instance_id) == "duplicate"
    assert _paused(fleet, runner_id)
    assert fleet.record(runner_key(instance_id))["interrupted_at"] == record["interrupted_at"]


def test_an_unknown_or_terminated_instance_is_ignored(fleet: Fleet) -> None:
    # given an instance the fleet never made, and one that is gone
    _, instance_id, _ = _launch_one(fleet, ["docker"])
    terminate_instances(fleet.ec2, [instance_id])
    fleet.run()

    # when EC2 warns about either
    # then nothing is marked or paused
    assert _warn(fleet, "i-0123456789abcdef0") == "ignored"
    assert _warn(fleet, instance_id) == "ignored"
    assert fleet.record(runner_key("i-0123456789abcdef0")) == {}
    assert "interrupted_at" not in fleet.record(runner_key(instance_id))


def test_a_rebalance_then_a_warning_is_two_marks_and_one_pause_each(fleet: Fleet) -> None:
    """EC2 may send the rebalance recommendation before the warning, or with it (rebalance-recommendations.html):
    each is recorded once, the draining reason is the latest. The recommendation alone drains the runner but does
    not mark it interrupted (its instance may well live): only the warning does."""
    job_id, instance_id, runner_id = _launch_one(fleet, ["docker"])
    _move(fleet, job_id, "running", runner_id)
    handler = fleet.runtime.interruptions()

    rebalance = parse_interruption(_event(rebalance_recommendation_entry(instance_id, "us-east-1")))
    assert handler.handle(rebalance) == "handled"
    first = fleet.record(runner_key(instance_id))
    assert "interrupted_at" not in first
    assert _paused(fleet, runner_id)
    assert _warn(fleet, instance_id) == "handled"
    assert handler.handle(rebalance) == "duplicate"

    record = fleet.record(runner_key(instance_id))
    assert record["interruptions"] == {"rebalance recommendation", "spot interruption warning"}
    assert record["interrupted_at"] >= first["draining_at"]
    assert record["draining"] == "spot interruption warning"
    assert _paused(fleet, runner_id)


def test_the_lost_job_is_retried_exactly_once_even_when_gitlab_fails_first(fleet: Fleet) -> None:
    """The webhook queues the retry (it never calls GitLab); scale-up makes it through ``POST
    /projects/:id/jobs/:job_id/retry`` (doc/api/jobs.md "Retry a job"). A 5xx re-queues the message like any
    retryable failure; a second message for the same job (a copy) retries nothing."""
    # given a job its interrupted runner failed, whose retry the webhook queued
    job_id, _, _ = _lost(fleet)
    [body] = fleet.take_queued(1)
    message = json.loads(body)
    assert (message["job_id"], message["retry_interrupted"]) == (job_id, "docker")

    # when GitLab fails the first retry call
    fleet.gitlab.fail_next("POST", r"/projects/\d+/jobs/\d+/retry", status=502)
    first = fleet.scale_up().handle_messages([body])

    # then the message comes back for another attempt, and that attempt retries the job
    assert first.as_dict() == {"retried": 1}
    [again] = fleet.take_queued(1)
    assert json.loads(again)["attempt"] == 2
    assert fleet.scale_up().handle_messages([again]).as_dict() == {"retried_after_interruption": 1}
    # and a copy of the message does nothing more
    assert fleet.scale_up().handle_messages([body]).as_dict() == {"duplicate": 1}
    tries = _tries(fleet, job_id)
    assert [(t["id"] == job_id, t["status"]) for t in tries] == [(True, "failed"), (False, "pending")]
    assert fleet.job(job_id)["interruption_retry_job"] == tries[1]["id"]


def test_a_lost_job_is_retried_even_when_its_instance_was_terminated_before_the_hook(fleet: Fleet) -> None:
    """EC2 terminates the instance once gitlab-runner is stopped, and its state-change event may be handled before
    GitLab's Job Hook for the failed job arrives: the terminated record still says the runner was interrupted
    while it ran the job."""
    # given a runner EC2 warned about, whose instance is gone (its record terminated) while GitLab shows it running
    job_id, instance_id, runner_id = _launch_one(fleet, ["docker"])
    _move(fleet, job_id, "running", runner_id)
    assert _warn(fleet, instance_id) == "handled"
    terminate_instances(fleet.ec2, [instance_id])
    fleet.run()
    assert fleet.record(runner_key(instance_id))["state"] == "terminated"

    # when the failed job's hook arrives (naming the runner the job ran on: GitLab clears a deleted runner from
    # its jobs later, by a loose foreign key's asynchronous nullify)
    fleet.gitlab.set_job_status(fleet.sandbox.project_id, job_id, "failed", failure_reason="runner_system_failure")
    fleet.gitlab.wait_for_deliveries(timeout=30)

    # then its retry is queued all the same
    [body] = fleet.take_queued(1)
    assert json.loads(body)["retry_interrupted"] == "docker"


@pytest.mark.parametrize("failure_reason", ["script_failure", "runner_system_failure"])
def test_no_retry_is_queued_for_a_job_that_failed_on_its_own(fleet: Fleet, failure_reason: str) -> None:
    """A script failure on an interrupted runner is the job's own; a runner system failure on a runner EC2 never
    warned about is not the interruption's doing. Neither is retried."""
    job_id, instance_id, runner_id = _launch_one(fleet, ["docker"])
    _move(fleet, job_id, "running", runner_id)
    if failure_reason == "script_failure":
        assert _warn(fleet, instance_id) == "handled"

    fleet.gitlab.set_job_status(
        fleet.sandbox.project_id, job_id, "failed", failure_reason=failure_reason, runner_id=runner_id
    )
    fleet.gitlab.wait_for_deliveries(timeout=30)

    assert fleet.take_queued(0, timeout=1.0) == []
    assert len(_tries(fleet, job_id)) == 1


def test_a_retry_whose_answer_was_lost_is_not_made_twice_nor_dead_lettered(fleet: Fleet) -> None:
    """GitLab makes the retry but its answer is lost: the message comes back, finds the job still ``failed``
    (GitLab shows no retried flag on it), and GitLab answers the second ``POST .../retry`` with 403 "Job is not
    retryable" (Ci::Build#retryable? is false once retried). That answer means done: one new job, no dead letter.
    Before, the 403 ended the message in the dead-letter queue."""
    # given a job its interrupted runner lost, whose retry the webhook queued
    job_id, _, _ = _lost(fleet)
    [body] = fleet.take_queued(1)

    # when GitLab makes the retry and the answer never comes back, and the message is handled again
    fleet.gitlab.fail_next("POST", r"/projects/\d+/jobs/\d+/retry", status=502, after_processing=True)
    first = fleet.scale_up().handle_messages([body])
    assert first.as_dict() == {"retried": 1}
    queued = [json.loads(b) for b in fleet.take_queued(2, timeout=30)]
    [back] = [m for m in queued if m.get("retry_interrupted")]
    later = fleet.scale_up().handle_messages([json.dumps(back)])

    # then the job was retried once (the new job's own message is the launch's), and the message ended as done
    tries = _tries(fleet, job_id)
    assert [(t["id"] == job_id, t["status"]) for t in tries] == [(True, "failed"), (False, "pending")]
    assert [m["job_id"] for m in queued if not m.get("retry_interrupted")] == [tries[1]["id"]]
    assert later.as_dict() == {"duplicate": 1}
    assert fleet.dead_letters(0, timeout=1.0) == []
    assert "interruption_retry_job" in fleet.job(job_id)


def test_a_job_its_user_retried_first_is_not_retried_again(fleet: Fleet) -> None:
    """The user pressed "Retry" before the fleet's message was handled: GitLab's job is theirs, and the fleet
    adds no second try."""
    # given a lost job whose retry the webhook queued, and the user retrying it themselves
    job_id, _, _ = _lost(fleet)
    [body] = fleet.take_queued(1)
    fleet.gitlab.retry_job(fleet.sandbox.project_id, job_id)

    # when the fleet's message is handled
    report = fleet.scale_up().handle_messages([body])

    # then nothing more was retried
    assert report.as_dict() == {"duplicate": 1}
    assert len(_tries(fleet, job_id)) == 2
    assert fleet.dead_letters(0, timeout=1.0) == []


def test_a_retried_job_lost_to_a_second_interruption_is_not_retried_again(fleet: Fleet) -> None:
    """Retries do not chain: the retried job's Job Hook carries ``retries_count`` 1 (the times GitLab retried
    it before), and a job that is itself a retry is not retried after an interruption. Before, every
    interruption retried again, without limit."""
    # given a lost job retried once by the fleet
    job_id, _, _ = _lost(fleet)
    [body] = fleet.take_queued(1)
    assert fleet.scale_up().handle_messages([body]).as_dict() == {"retried_after_interruption": 1}
    retried = int(_tries(fleet, job_id)[1]["id"])

    # when the retry runs on a spot runner that is interrupted too, and fails as the shutdown fails it
    before = {i["InstanceId"] for i in fleet.instances()}
    [launch] = fleet.take_queued(1, timeout=30)
    assert fleet.scale_up().handle_messages([launch]).as_dict() == {"launched": 1}
    [instance_id] = [i["InstanceId"] for i in fleet.instances() if i["InstanceId"] not in before]
    description = runner_description(fleet.config.fleet, "docker", instance_id)
    [runner_id] = [int(r["id"]) for r in fleet.gitlab_runners() if r["description"] == description]
    _move(fleet, retried, "running", runner_id)
    assert _warn(fleet, instance_id) == "handled"
    fleet.gitlab.set_job_status(
        fleet.sandbox.project_id, retried, "failed", failure_reason="runner_system_failure", runner_id=runner_id
    )
    fleet.gitlab.wait_for_deliveries(timeout=30)

    # then its message is not retried: the chain ends with the second failure
    [second] = fleet.take_queued(1, timeout=30)
    assert json.loads(second)["retries"] == 1
    assert fleet.scale_up().handle_messages([second]).as_dict() == {"not_retried": 1}
    assert len(_tries(fleet, job_id)) == 2
