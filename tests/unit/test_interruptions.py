"""Spot interruption events as EventBridge delivers them, and the decisions about the jobs they cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chalicelib.config import parse_config
from chalicelib.errors import PayloadError
from chalicelib.intake.job_hooks import JobStatus
from chalicelib.lifecycle.interruptions import (
    Interruption,
    RetryDecision,
    asks_for_retry,
    decide_retry,
    parse_interruption,
)
from tests.unit.test_config import with_pool

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "aws"


def fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))


WARNING = fixture("ec2-spot-interruption-warning.json")
REBALANCE = fixture("ec2-rebalance-recommendation.json")


def test_the_documented_spot_interruption_warning_decodes() -> None:
    """The example of the EC2 User Guide, "Spot Instance interruption notices"
    (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html)."""
    event = parse_interruption(WARNING)

    assert event.kind is Interruption.SPOT_WARNING
    assert (event.instance_id, event.instance_action) == ("i-0a1b2c3d4e5f60718", "terminate")
    assert event.id == WARNING["id"]


@pytest.mark.parametrize("action", ["hibernate", "stop", "terminate"])
def test_every_documented_instance_action_is_a_warning(action: str) -> None:
    event = parse_interruption({**WARNING, "detail": {**WARNING["detail"], "instance-action": action}})
    assert (event.kind, event.instance_action) == (Interruption.SPOT_WARNING, action)


def test_the_documented_rebalance_recommendation_decodes() -> None:
    """The example of the EC2 User Guide, "EC2 instance rebalance recommendations"
    (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/rebalance-recommendations.html): no instance-action."""
    event = parse_interruption(REBALANCE)

    assert event.kind is Interruption.REBALANCE
    assert (event.instance_id, event.instance_action) == ("i-0a1b2c3d4e5f60718", "")


def test_fields_added_later_are_ignored() -> None:
    event = parse_interruption({**WARNING, "detail": {**WARNING["detail"], "instance-termination-time": "x"}})
    assert event.instance_id == "i-0a1b2c3d4e5f60718"


@pytest.mark.parametrize(
    "event",
    [
        # another aws.ec2 event
        {**WARNING, "detail-type": "EC2 Instance State-change Notification"},
        # a warning without the action EC2 always sends with it
        {**WARNING, "detail": {"instance-id": "i-0a1b2c3d4e5f60718"}},
        {**WARNING, "detail": {"instance-id": "i-0a1b2c3d4e5f60718", "instance-action": ""}},
        # no instance, or not an instance id
        {**REBALANCE, "detail": {}},
        {**REBALANCE, "detail": {"instance-id": 12}},
        {**REBALANCE, "detail": {"instance-id": "sir-0a1b2c3d"}},
        {**REBALANCE, "detail": {"instance-id": ""}},
        {**WARNING, "detail": {"instance-id": "i-0a1b2c3d4e5f60718", "instance-action": 3}},
        {key: value for key, value in WARNING.items() if key != "detail-type"},
        {key: value for key, value in WARNING.items() if key != "detail"},
        "not an event",
    ],
)
def test_anything_else_is_refused_as_a_payload_error(event: Any) -> None:
    with pytest.raises(PayloadError):
        parse_interruption(event)


@pytest.mark.parametrize(
    ("status", "failure_reason", "interrupted", "retried"),
    [
        # the one case: the interrupted runner's job failed as gitlab-runner fails it on a system interrupt
        (JobStatus.FAILED, "runner_system_failure", True, True),
        # the same failure on a runner EC2 never warned about is not the interruption's doing
        (JobStatus.FAILED, "runner_system_failure", False, False),
        # the job's own failures, even on an interrupted runner
        (JobStatus.FAILED, "script_failure", True, False),
        (JobStatus.FAILED, "job_execution_timeout", True, False),
        (JobStatus.FAILED, None, True, False),
        # a job that finished otherwise
        (JobStatus.SUCCESS, None, True, False),
        (JobStatus.CANCELED, None, True, False),
    ],
)
def test_only_a_runner_system_failure_on_an_interrupted_runner_asks_for_a_retry(
    status: JobStatus, failure_reason: str | None, interrupted: bool, retried: bool
) -> None:
    assert asks_for_retry(status, failure_reason, interrupted) is retried


@pytest.mark.parametrize(
    ("setting", "decision"),
    [
        ({}, RetryDecision.RETRY),
        ({"retry_interrupted_jobs": True}, RetryDecision.RETRY),
        ({"retry_interrupted_jobs": False}, RetryDecision.POOL_DOES_NOT_RETRY),
    ],
)
def test_the_pool_decides_whether_its_lost_jobs_are_retried(setting: dict[str, Any], decision: RetryDecision) -> None:
    pool = parse_config(with_pool(**setting)).pools[0]
    assert decide_retry(pool) is decision


def test_a_pool_no_longer_configured_retries_nothing() -> None:
    assert decide_retry(None) is RetryDecision.UNKNOWN_POOL
