"""The fleet table: one DynamoDB table holding jobs, runners, pools and images, keyed by kind.

Keys: ``JOB#<project>:<job>``, ``RUNNER#<instance or launch id>``, ``POOL#<name>``, ``IMAGE#<pool>``, plus
``DELIVERY#<key>`` (webhook de-duplication) and ``REPLAY#<id>:<timestamp>`` (signed-delivery replay guard),
which expire by TTL. Every state change is a conditional write, so two Lambdas racing on the same item never
both win; webhooks arrive in any order, so a job record only moves forward in its life.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.gitlab_events import FINISHED_RANK, JobStatus

DELIVERY_TTL_SECONDS = 24 * 3600
FINISHED_JOB_TTL_SECONDS = 7 * 24 * 3600
_CONFLICT_ATTEMPTS = 4

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


def job_key(project_id: int, job_id: int) -> str:
    return f"JOB#{project_id}:{job_id}"


def _attribute(value: Any) -> dict[str, Any]:
    # DynamoDB numbers are decimals; boto3 refuses floats rather than guess their precision.
    if isinstance(value, float):
        value = Decimal(repr(value))
    return dict(_serializer.serialize(value))


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def to_item(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _attribute(v) for k, v in values.items() if v is not None}


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
    """A job status change as the webhook reports it."""

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
        """Record a delivery and apply its job status in one transaction (one API call).

        The delivery item's condition drops a redelivered webhook; the job item's condition drops an event older
        than what the record already holds (a finished job never goes back). An equal rank is accepted so a
        pending job whose first queueing failed can be queued again by GitLab's retry.
        """
        now = self._clock()
        writes: list[dict[str, Any]] = []
        if replay_key is not None:
            writes.append(self._put_once(f"REPLAY#{replay_key}", now))
        writes.append(self._put_once(f"DELIVERY#{delivery_key}", now))
        writes.append({"Update": self._job_update(event, now)})
        for attempt in range(_CONFLICT_ATTEMPTS):
            try:
                self._client.transact_write_items(TransactItems=writes)
            except ClientError as exc:
                if error_code(exc) != "TransactionCanceledException":
                    raise
                outcome = self._cancelled_outcome(exc, replay_key is not None)
                if outcome is not None:
                    return outcome
                # Another transaction held one of the items (concurrent deliveries of the same job): try again.
                self._sleep(0.01 * (attempt + 1))
                continue
            return EventOutcome.RECORDED
        raise RuntimeError("fleet table transaction kept conflicting")

    def forget_delivery(self, delivery_key: str, replay_key: str | None = None) -> None:
        """Undo a delivery record so that GitLab's retry of it is processed, not dropped as a duplicate."""
        keys = [f"DELIVERY#{delivery_key}"] + ([f"REPLAY#{replay_key}"] if replay_key else [])
        for pk in keys:
            self._client.delete_item(TableName=self.table, Key={"pk": {"S": pk}})

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

    def _put_once(self, pk: str, now: float) -> dict[str, Any]:
        return {
            "Put": {
                "TableName": self.table,
                "Item": to_item({"pk": pk, "kind": "delivery", "ttl": int(now) + DELIVERY_TTL_SECONDS}),
                "ConditionExpression": "attribute_not_exists(pk)",
            }
        }

    def _job_update(self, event: JobEvent, now: float) -> dict[str, Any]:
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
        }
        if event.status.finished:
            values["ttl"] = int(now) + FINISHED_JOB_TTL_SECONDS
        present = {k: v for k, v in values.items() if v is not None}
        names = {f"#a{i}": k for i, k in enumerate(present)}
        assignments = ", ".join(f"#a{i} = :v{i}" for i in range(len(present)))
        attribute_values = {f":v{i}": _attribute(v) for i, v in enumerate(present.values())}
        names["#rank"] = "status_rank"
        attribute_values[":rank"] = _attribute(event.status.rank)
        attribute_values[":finished"] = _attribute(FINISHED_RANK)
        return {
            "TableName": self.table,
            "Key": {"pk": {"S": job_key(event.project_id, event.job_id)}},
            "UpdateExpression": "SET " + assignments,
            "ConditionExpression": "attribute_not_exists(pk) OR (#rank <= :rank AND #rank < :finished)",
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": attribute_values,
        }

    @staticmethod
    def _cancelled_outcome(exc: ClientError, has_replay: bool) -> EventOutcome | None:
        """Which condition cancelled the transaction; None when it was a conflict worth retrying."""
        reasons = [r.get("Code", "None") for r in exc.response.get("CancellationReasons", [])]
        failed = [i for i, code in enumerate(reasons) if code == "ConditionalCheckFailed"]
        if not failed:
            if "TransactionConflict" in reasons:
                return None
            raise exc
        first = failed[0]
        if has_replay:
            if first == 0:
                return EventOutcome.REPLAY
            first -= 1
        return EventOutcome.DUPLICATE if first == 0 else EventOutcome.STALE
