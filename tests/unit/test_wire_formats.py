"""The jobs-queue message and the EC2 state-change event, decoded strictly at the edge."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chalicelib.errors import PayloadError
from chalicelib.jobs_queue import QueuedJob
from chalicelib.lifecycle.instances import parse_state_change

# A message as the webhook has always written it (every field, in declaration order, before pool and tags).
WEBHOOK_MESSAGE = {
    "project_id": 7,
    "job_id": 4242,
    "received_at": 1764417600.25,
    "pipeline_id": 99,
    "job_name": "test",
    "gitlab_instance": "https://gitlab.example.com",
    "delivery": "2f0c3a",
    "attempt": 1,
    "waits": 0,
    "last_error": "",
}


def test_a_queued_job_survives_the_queue_unchanged() -> None:
    job = QueuedJob(project_id=7, job_id=4242, received_at=1.5, pool="docker", tags=("docker", "linux"), attempt=3)
    assert QueuedJob.from_json(job.to_json()) == job
    assert json.loads(job.to_json())["tags"] == ["docker", "linux"]


def test_the_webhooks_message_format_still_decodes() -> None:
    job = QueuedJob.from_json(json.dumps(WEBHOOK_MESSAGE))
    assert (job.project_id, job.job_id, job.pipeline_id, job.attempt, job.pool, job.tags) == (7, 4242, 99, 1, "", ())
    # and what is written now reads back as the same JSON object, with pool, tags, the grace mark, the
    # interruption retry and the job's earlier retries added
    assert json.loads(job.to_json()) == {
        **WEBHOOK_MESSAGE,
        "pool": "",
        "tags": [],
        "graced": False,
        "retry_interrupted": "",
        "retries": 0,
    }


def test_unknown_fields_are_ignored_and_an_integer_time_is_a_time() -> None:
    job = QueuedJob.from_json(json.dumps({**WEBHOOK_MESSAGE, "received_at": 1764417600, "added_later": {"x": 1}}))
    assert job.received_at == 1764417600.0


@pytest.mark.parametrize(
    "change",
    [
        {"job_id": "4242"},
        {"job_id": True},
        {"job_id": 0},
        {"project_id": -1},
        {"project_id": 2**63},
        {"attempt": 0},
        {"attempt": 1.5},
        {"waits": -1},
        {"tags": ["docker", 1]},
        {"job_id": None},
    ],
)
def test_a_malformed_message_is_refused_naming_its_field(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(change))):
        QueuedJob.from_json(json.dumps({**WEBHOOK_MESSAGE, **change}))


@pytest.mark.parametrize("body", ["this is not a job", "[1, 2]", '{"project_id": 7}', ""])
def test_a_body_that_is_no_job_is_refused(body: str) -> None:
    with pytest.raises(ValueError):
        QueuedJob.from_json(body)


def state_change(**detail: Any) -> dict[str, Any]:
    """An "EC2 Instance State-change Notification" as EventBridge delivers it."""
    return {
        "version": "0",
        "id": "7bf73129-1428-4cd3-a780-95db273d1602",
        "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2",
        "account": "123456789012",
        "time": "2026-11-29T12:00:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:ec2:us-east-1:123456789012:instance/i-abcd1111"],
        "detail": {"instance-id": "i-abcd1111", "state": "terminated", **detail},
    }


def test_a_state_change_event_decodes() -> None:
    change = parse_state_change(state_change())
    assert (change.instance_id, change.state) == ("i-abcd1111", "terminated")
    # a state EC2 adds later decodes too (the handler ignores it)
    assert parse_state_change(state_change(state="hibernating")).state == "hibernating"


@pytest.mark.parametrize(
    "event",
    [
        {**state_change(), "detail-type": "EC2 Spot Instance Interruption Warning"},
        {**state_change(), "detail": {"state": "terminated"}},
        {**state_change(), "detail": {"instance-id": 12, "state": "terminated"}},
        {"detail-type": "EC2 Instance State-change Notification"},
        "not an event",
    ],
)
def test_anything_else_is_refused_as_a_payload_error(event: Any) -> None:
    with pytest.raises(PayloadError):
        parse_state_change(event)
