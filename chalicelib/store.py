"""The fleet table: one DynamoDB table holding jobs, runners, pools and images, keyed by kind.

Keys: ``JOB#<project>:<job>``, ``RUNNER#<instance id>``, ``LAUNCH#<launch id>``, ``POOL#<name>``, ``IMAGE#<pool>``,
``TOKEN#<role id>:<instance id>`` (a runner's GitLab token, see ``chalicelib.runner_tokens``).
A job item also remembers the webhook deliveries (and signed attempts) it has seen, for de-duplication, and
expires by TTL: soon once finished, and long after its last event otherwise, since GitLab sends no Job Hook
when it skips a job (a later stage after a failure) and such a record would never hear of its end. Every state
change is a conditional write, so two Lambdas racing on the same item never both win; webhooks arrive in any
order, so a job record only moves forward in its life.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.errors import PayloadTooLargeError
from chalicelib.gitlab_events import FINISHED_RANK, JobStatus

FINISHED_JOB_TTL_SECONDS = 7 * 24 * 3600
# Far beyond any wait GitLab allows a live job (a pending one is dropped as stuck after a day); a job that comes
# back later (a stage unblocked by a manual job, say) is recorded afresh by its next Job Hook.
UNFINISHED_JOB_TTL_SECONDS = 30 * 24 * 3600
_ITEM_TOO_LARGE = "exceeded the maximum allowed size"  # DynamoDB's ValidationException message for a 400 KB item

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


def job_key(project_id: int, job_id: int) -> str:
    return f"JOB#{project_id}:{job_id}"


def launch_key(launch_id: str) -> str:
    return f"LAUNCH#{launch_id}"


def runner_key(instance_id: str) -> str:
    return f"RUNNER#{instance_id}"


def pool_key(pool: str) -> str:
    return f"POOL#{pool}"


def token_key(session_user_id: str) -> str:
    """The item holding a runner's token, keyed by its instance's ``aws:userid`` (``<role id>:<instance id>``)."""
    return f"TOKEN#{session_user_id}"


def attribute_value(value: Any) -> dict[str, Any]:
    # DynamoDB numbers are decimals; boto3 refuses floats rather than guess their precision.
    if isinstance(value, float):
        value = Decimal(repr(value))
    return dict(_serializer.serialize(value))


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def to_item(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: attribute_value(v) for k, v in values.items() if v is not None}


def from_item(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _plain(_deserializer.deserialize(v)) for k, v in item.items()}


class EventOutcome(str, Enum):
    """What recording a webhook delivery did."""

    RECORDED = "recorded"
    DUPLICATE = "duplicate"  # this delivery (Idempotency-Key) was already processed
    REPLAY = "replay"  # this exact signed attempt (id and timestamp) was already seen
    STALE = "stale"  # the job is already further along than this event says


@dataclass(frozen=True)
class JobEvent:
    """A job status change as the webhook reports it.

    Its values come from a ``JobHook`` and the webhook's headers, bounded there (ids within a signed 64-bit
    integer, every string a few KB at most), so one event's write stays far below DynamoDB's 400 KB item limit.
    """

    project_id: int
    job_id: int
    status: JobStatus
    received_at: float
    pipeline_id: int | None = None
    name: str = ""
    stage: str = ""
    ref: str = ""
    gitlab_instance: str = ""
    runner_id: int | None = None
    runner_description: str | None = None
    failure_reason: str | None = None


class FleetStore:
    """Conditional reads and writes on the fleet table through the low-level DynamoDB client."""

    def __init__(
        self,
        table: str,
        client: Any,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.table = table
        self._client = client
        self._clock = clock
        self._sleep = sleep

    def record_job_event(self, delivery_key: str, event: JobEvent, replay_key: str | None = None) -> EventOutcome:
        """Record a delivery on its job's item and apply the job's status, in one conditional write.

        A delivery always concerns one job, so its key is kept in a set on that job's item: the condition refuses
        a key already there (GitLab redelivering), an exact replay of a signed attempt, and an event older than
        what the item holds (webhooks arrive in any order; a finished job never goes back). An equal rank is
        accepted so that a pending job whose first queueing failed is queued by a resend of the delivery. On refusal the
        old item comes back with the error, which says which of the three it was, at no extra call.
        """
        writer = uuid.uuid4().hex
        try:
            old = self._update_unless_refused(self._job_update(event, self._clock(), delivery_key, replay_key, writer))
        except ClientError as exc:
            # Every write adds its delivery key, so a job flooded with distinct deliveries reaches DynamoDB's 400 KB
            # item limit; no retry can ever succeed, so it is the request's fault, not ours (a 503 is retried).
            if error_code(exc) == "ValidationException" and _ITEM_TOO_LARGE in str(exc):
                raise PayloadTooLargeError(f"the record of job {event.project_id}:{event.job_id} is full") from None
            raise
        if old is None or old.get("writer") == writer:
            # Refused by our own write: botocore retried a call whose answer timed out after it landed.
            return EventOutcome.RECORDED
        if replay_key is not None and replay_key in old.get("replays", set()):
            return EventOutcome.REPLAY
        if delivery_key in old.get("deliveries", set()):
            return EventOutcome.DUPLICATE
        return EventOutcome.STALE

    def _update_unless_refused(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """Make a conditional UpdateItem: None when it applied, else the item as it was when it was refused."""
        try:
            self._client.update_item(**request, ReturnValuesOnConditionCheckFailure="ALL_OLD")
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            item = exc.response.get("Item")
            return from_item(item) if item else self.get(request["Key"]["pk"]["S"]) or {}
        return None

    def forget_delivery(self, project_id: int, job_id: int, delivery_key: str, replay_key: str | None = None) -> None:
        """Undo a delivery record so that a resend of it is processed, not dropped as a duplicate."""
        expression = "DELETE deliveries :key" + (", replays :replay" if replay_key else "")
        values: dict[str, Any] = {":key": {"SS": [delivery_key]}}
        if replay_key:
            values[":replay"] = {"SS": [replay_key]}
        self._client.update_item(
            TableName=self.table,
            Key={"pk": {"S": job_key(project_id, job_id)}},
            UpdateExpression=expression,
            ExpressionAttributeValues=values,
        )

    def get(self, pk: str, consistent: bool = True) -> dict[str, Any] | None:
        found = self._client.get_item(TableName=self.table, Key={"pk": {"S": pk}}, ConsistentRead=consistent)
        item = found.get("Item")
        return from_item(item) if item else None

    def scan(self, kind: str | None = None) -> Iterator[dict[str, Any]]:
        """Every item (of one kind). For the operator's status view, never on a Lambda hot path."""
        kwargs: dict[str, Any] = {"TableName": self.table}
        if kind is not None:
            kwargs["FilterExpression"] = "kind = :kind"
            kwargs["ExpressionAttributeValues"] = {":kind": {"S": kind}}
        for page in self._client.get_paginator("scan").paginate(**kwargs):
            for item in page.get("Items", []):
                yield from_item(item)

    def _job_update(
        self, event: JobEvent, now: float, delivery_key: str, replay_key: str | None, writer: str
    ) -> dict[str, Any]:
        values: dict[str, Any] = {
            "kind": "job",
            "project_id": event.project_id,
            "job_id": event.job_id,
            "status": event.status.value,
            "status_rank": event.status.rank,
            "updated_at": now,
            "pipeline_id": event.pipeline_id,
            "name": event.name,
            "stage": event.stage,
            "ref": event.ref,
            "gitlab_instance": event.gitlab_instance,
            "runner_id": event.runner_id,
            "runner_description": event.runner_description,
            "failure_reason": event.failure_reason,
            f"{event.status.value}_at": event.received_at,
            "writer": writer,
        }
        values["ttl"] = int(now) + (FINISHED_JOB_TTL_SECONDS if event.status.finished else UNFINISHED_JOB_TTL_SECONDS)
        present = {k: v for k, v in values.items() if v is not None}
        names = {f"#a{i}": k for i, k in enumerate(present)}
        assignments = ", ".join(f"#a{i} = :v{i}" for i in range(len(present)))
        attribute_values = {f":v{i}": attribute_value(v) for i, v in enumerate(present.values())}
        names["#rank"] = "status_rank"
        attribute_values[":rank"] = attribute_value(event.status.rank)
        attribute_values[":finished"] = attribute_value(FINISHED_RANK)
        attribute_values[":key"] = {"S": delivery_key}
        attribute_values[":keys"] = {"SS": [delivery_key]}
        additions = "deliveries :keys"
        condition = (
            "(attribute_not_exists(pk) OR (#rank <= :rank AND #rank < :finished)) AND NOT contains(deliveries, :key)"
        )
        if replay_key is not None:
            attribute_values[":replay"] = {"S": replay_key}
            attribute_values[":replays"] = {"SS": [replay_key]}
            additions += ", replays :replays"
            condition += " AND NOT contains(replays, :replay)"
        return {
            "TableName": self.table,
            "Key": {"pk": {"S": job_key(event.project_id, event.job_id)}},
            "UpdateExpression": f"SET {assignments} ADD {additions}",
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": attribute_values,
        }
