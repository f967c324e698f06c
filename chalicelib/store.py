"""The fleet table: one DynamoDB table holding jobs, runners, pools and images, keyed by kind.

Keys: ``JOB#<project>:<job>``, ``RUNNER#<instance id>``, ``LAUNCH#<launch id>``, ``POOL#<name>``, ``IMAGE#<pool>``,
``TOKEN#<role id>:<instance id>`` (a runner's GitLab token, see ``chalicelib.scaling.tokens``), and
``HOOK#<project>``: the GitLab hook ``fleetctl gitlab connect`` made, which ``fleetctl status`` asks GitLab about.
A job item also remembers the webhook deliveries (and signed attempts) it has seen, for de-duplication, and
expires by TTL: soon once finished, and long after its last event otherwise, since GitLab sends no Job Hook
when it skips a job (a later stage after a failure) and such a record would never hear of its end. Every state
change is a conditional write, so two Lambdas racing on the same item never both win; webhooks arrive in any
order, so a job record only moves forward in its life.

A pending job is recorded first and queued second: its item says ``queued = false`` until the jobs-queue send
succeeded, then ``queued = true`` and ``queued_at``. GitLab never redelivers a delivery we failed to answer, so a
pending job recorded but never queued stays findable in the table (:func:`is_unqueued_pending`,
:meth:`FleetStore.unqueued_pending_jobs`) for a resend of its delivery or a later sweep to queue. Whoever sends
holds the item's queue claim (``queue_claim``, ``queue_claim_at``) meanwhile, so copies of one delivery arriving
together send once; a claim is dropped when its send fails, and one older than ``QUEUE_CLAIM_SECONDS`` (its holder
died) may be taken over.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any, TypeVar

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.errors import PayloadTooLargeError
from chalicelib.intake.job_hooks import FINISHED_RANK, JobStatus

FINISHED_JOB_TTL_SECONDS = 7 * 24 * 3600
# Far beyond any wait GitLab allows a live job (a pending one is dropped as stuck after a day); a job that comes
# back later (a stage unblocked by a manual job, say) is recorded afresh by its next Job Hook.
UNFINISHED_JOB_TTL_SECONDS = 30 * 24 * 3600
# A queue claim this old belongs to a webhook that died between recording and sending (the webhook Lambda runs for
# 10 s at most): another may take it over.
QUEUE_CLAIM_SECONDS = 60
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


def hook_key(project_id: int) -> str:
    return f"HOOK#{project_id}"


# The sparse global secondary index of idle runners: only a runner record that is idle, with builds left, carries
# ``idle_pool`` (its pool) and ``idle_since``, so scale-up counts a pool's idle runners with one Query.
IDLE_RUNNERS_INDEX = "idle-runners"
# The sparse global secondary index of the fleet's live records, which reconcile reads instead of the whole table:
# an item carries ``live`` (its kind) while reconcile may have to act on it, and loses it once settled. Runner
# records while their instance lives or their cleanup is unfinished, launches until launched (or settled), pool
# counters always, and job items until their job finished. Token items never carry it.
FLEET_RECORDS_INDEX = "fleet-records"
# The sparse global secondary index of runner tokens by boot deadline (keys only, so no token is copied into it):
# a token item carries ``token_index`` and ``token_due`` (its boot deadline), so reconcile finds the tokens past
# their deadline with one Query, never a scan.
TOKEN_DEADLINES_INDEX = "token-deadlines"  # noqa: S105 - an index name, not a secret
TOKEN_INDEX_KEY = "token"  # noqa: S105 - the index's partition value, not a secret
LIVE_ATTRIBUTE = "live"
# The draining reason of a runner paused for retirement starts with this (reconcile's retirement, two runs).
RETIRING = "retiring: "


class RunnerState(str, Enum):
    """Where a runner record is in its life; the Job Hooks' running and finished events move idle and busy.

    Draining is not a state of its own but a mark beside it (``draining``, the reason): a draining runner is paused
    in GitLab, takes no new job and is not counted idle, while the Job Hooks still say whether it runs one.
    """

    BOOTING = "booting"  # its instance was launched; the runner has not taken a job yet
    BUSY = "busy"  # running a job
    IDLE = "idle"  # between jobs, with builds left: it takes the next matching job by itself
    DONE = "done"  # ran its last build; its instance powers off
    TERMINATED = "terminated"  # its instance is gone and its lease back in the pool


@dataclass(frozen=True)
class RunnerActivity:
    """A runner record as a Job Hook's running or finished event left it (only the fields the webhook uses)."""

    instance_id: str
    pool: str
    launched_at: float
    first_job: bool  # this running event is its first job: its boot is over


@dataclass(frozen=True)
class RunnerFinish:
    """A runner record as a Job Hook's finished event left it: its new state (None while it still runs another
    job, when something moved it meanwhile, or when its instance is terminated already), its pool, and whether
    EC2 warned that its instance was being interrupted (``interrupted_at`` on the record)."""

    state: RunnerState | None
    pool: str
    interrupted: bool


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
    # This delivery (Idempotency-Key) was recorded before, but its pending job was never queued (the send failed):
    # a resend of it queues the job now.
    UNQUEUED = "unqueued"
    DUPLICATE = "duplicate"  # this delivery (Idempotency-Key) was already processed
    ALREADY_QUEUED = "already queued"  # another delivery of this pending job already queued it
    REPLAY = "replay"  # this exact signed attempt (id and timestamp) was already seen
    STALE = "stale"  # the job is already further along than this event says


@dataclass(frozen=True)
class Recorded:
    """What recording a delivery did; ``claim`` is set when the caller is to queue the job, and names the queue
    claim it holds (for :meth:`FleetStore.release_queue_claim` should the send fail)."""

    outcome: EventOutcome
    claim: str | None = None


def is_unqueued_pending(item: Mapping[str, Any]) -> bool:
    """A job item the webhook recorded as pending whose queue send never succeeded, and that scale-up has not seen
    since (no claim, no outcome). Items written before the ``queued`` attribute existed carry none and are not
    counted: they were queued when recorded."""
    return (
        item.get("kind") == "job"
        and item.get("status") == JobStatus.PENDING.value
        and item.get("queued") is False
        and "launch_id" not in item
        and "outcome" not in item
    )


@dataclass(frozen=True)
class UnqueuedJob:
    """A pending job recorded but never queued: what is needed to queue it again."""

    project_id: int
    job_id: int
    pending_at: float
    pipeline_id: int | None = None
    name: str = ""
    gitlab_instance: str = ""

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> UnqueuedJob:
        pipeline_id = item.get("pipeline_id")
        return cls(
            project_id=int(item["project_id"]),
            job_id=int(item["job_id"]),
            pending_at=float(item.get("pending_at", 0)),
            pipeline_id=None if pipeline_id is None else int(pipeline_id),
            name=str(item.get("name", "")),
            gitlab_instance=str(item.get("gitlab_instance", "")),
        )


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
    retries_count: int = 0  # how many times GitLab retried the job before this one (the Job Hook's)


@dataclass(frozen=True)
class HookRecord:
    """The GitLab project hook feeding this fleet, as ``fleetctl gitlab connect`` created or updated it."""

    project_id: int
    hook_id: int
    gitlab_url: str
    webhook_url: str
    connected_at: float = 0.0

    def to_item(self) -> dict[str, Any]:
        return to_item(
            {
                "pk": hook_key(self.project_id),
                "kind": "hook",
                "project_id": self.project_id,
                "hook_id": self.hook_id,
                "gitlab_url": self.gitlab_url,
                "webhook_url": self.webhook_url,
                "connected_at": self.connected_at,
                # Its project's pending jobs are swept by reconcile, for deliveries GitLab never made.
                LIVE_ATTRIBUTE: "hook",
            }
        )

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> HookRecord:
        return cls(
            project_id=int(item["project_id"]),
            hook_id=int(item["hook_id"]),
            gitlab_url=str(item.get("gitlab_url", "")),
            webhook_url=str(item.get("webhook_url", "")),
            connected_at=float(item.get("connected_at", 0)),
        )


@dataclass(frozen=True)
class _Refused:
    """A runner record's conditional write was refused; ``item`` is the record as it was ({} when none)."""

    item: dict[str, Any]


_T = TypeVar("_T")
_BACKOFF_BASE_SECONDS = 0.025
_BACKOFF_CAP_SECONDS = 1.0
# A Job Hook's write to a runner record can meet a transaction on that record (scale-up recording it, the
# instance-state handler's cleanup): DynamoDB refuses it with TransactionConflictException, which botocore does not
# retry. The webhook tries a few times (well under a second), then logs it (RunnerActivityNotRecorded).
RUNNER_WRITE_ATTEMPTS = 4


def conflict_backoff(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1`` of a write that met a conflict: exponential, equal jitter."""
    step = min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2**attempt)
    return float(step / 2 + (rng or random).uniform(0, step / 2))


class FleetStore:
    """Conditional reads and writes on the fleet table through the low-level DynamoDB client."""

    # Attempts of a single-item write that meets a transaction on its item (see _past_conflicts).
    conflict_attempts = RUNNER_WRITE_ATTEMPTS

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

    def record_job_event(self, delivery_key: str, event: JobEvent, replay_key: str | None = None) -> Recorded:
        """Record a delivery on its job's item and apply the job's status, in one conditional write.

        A delivery always concerns one job, so its key is kept in a set on that job's item: the condition refuses
        a key already there (a resend), an exact replay of a signed attempt, an event older than what the item
        holds (webhooks arrive in any order; a finished job never goes back) and, for a pending event, a job
        already queued. An equal rank is accepted, so a second hook's delivery of the same status is recorded. A
        pending event records the job as not yet queued, under this call's queue claim (:meth:`mark_queued` follows
        the send). On refusal the old item comes back with the error, which says which it was at no extra call: a
        resend of a delivery whose job was never queued, and whose claim is free, is ``UNQUEUED`` once this call
        took the claim, to be queued now.
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
        pending = event.status is JobStatus.PENDING
        if old is None or old.get("writer") == writer:
            # (The second: refused by our own write, which landed before botocore retried the timed-out call.)
            return Recorded(EventOutcome.RECORDED, writer if pending else None)
        if replay_key is not None and replay_key in old.get("replays", set()):
            return Recorded(EventOutcome.REPLAY)
        if delivery_key in old.get("deliveries", set()):
            if pending and is_unqueued_pending(old) and self._take_queue_claim(event, old, writer):
                return Recorded(EventOutcome.UNQUEUED, writer)
            return Recorded(EventOutcome.DUPLICATE)
        if pending and old.get("status") == JobStatus.PENDING.value and old.get("queued") is True:
            return Recorded(EventOutcome.ALREADY_QUEUED)
        return Recorded(EventOutcome.STALE)

    def _take_queue_claim(self, event: JobEvent, old: Mapping[str, Any], claim: str) -> bool:
        """Take the queue claim of an unqueued job when it is free (released, or its holder died): one conditional
        write, which only one of several copies of a delivery arriving together wins."""
        now = self._clock()
        held = old.get("queue_claim")
        if held is not None and float(old.get("queue_claim_at", 0)) > now - QUEUE_CLAIM_SECONDS:
            return False
        values: dict[str, Any] = {":claim": {"S": claim}, ":now": attribute_value(now), ":no": {"BOOL": False}}
        condition = "#queued = :no AND "
        if held is None:
            condition += "attribute_not_exists(queue_claim)"
        else:
            condition += "queue_claim = :held"
            values[":held"] = {"S": str(held)}
        request = {
            "TableName": self.table,
            "Key": {"pk": {"S": job_key(event.project_id, event.job_id)}},
            "UpdateExpression": "SET queue_claim = :claim, queue_claim_at = :now",
            "ConditionExpression": condition,
            "ExpressionAttributeNames": {"#queued": "queued"},
            "ExpressionAttributeValues": values,
        }
        refused = self._update_unless_refused(request)
        return refused is None or refused.get("queue_claim") == claim

    def release_queue_claim(self, project_id: int, job_id: int, claim: str) -> None:
        """Give back a queue claim whose send failed, so that a resend of the delivery can queue the job at once."""
        try:
            self._client.update_item(
                TableName=self.table,
                Key={"pk": {"S": job_key(project_id, job_id)}},
                UpdateExpression="REMOVE queue_claim, queue_claim_at",
                ConditionExpression="queue_claim = :claim",
                ExpressionAttributeValues={":claim": {"S": claim}},
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise

    def mark_queued(self, project_id: int, job_id: int) -> None:
        """Record that the job's queue message was sent: it is no longer an unqueued pending job."""
        try:
            self._client.update_item(
                TableName=self.table,
                Key={"pk": {"S": job_key(project_id, job_id)}},
                UpdateExpression="SET #queued = :true, queued_at = :now REMOVE queue_claim, queue_claim_at",
                ConditionExpression="attribute_exists(pk)",  # never leave a stub item behind
                ExpressionAttributeNames={"#queued": "queued"},
                ExpressionAttributeValues={":true": {"BOOL": True}, ":now": attribute_value(self._clock())},
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise

    def unqueued_pending_jobs(self, recorded_before: float | None = None) -> Iterator[UnqueuedJob]:
        """Pending jobs recorded but never queued (:func:`is_unqueued_pending`), those recorded before
        ``recorded_before`` only when given (a send may be in flight for a job recorded a moment ago). A scan: for
        a periodic sweep or the operator, never on the webhook's path."""
        values: dict[str, Any] = {
            ":job": {"S": "job"},
            ":pending": {"S": JobStatus.PENDING.value},
            ":no": {"BOOL": False},
        }
        condition = (
            "kind = :job AND #status = :pending AND #queued = :no"
            " AND attribute_not_exists(launch_id) AND attribute_not_exists(outcome)"
        )
        if recorded_before is not None:
            values[":before"] = attribute_value(recorded_before)
            condition += " AND pending_at < :before"
        pages = self._client.get_paginator("scan").paginate(
            TableName=self.table,
            FilterExpression=condition,
            ExpressionAttributeNames={"#status": "status", "#queued": "queued"},
            ExpressionAttributeValues=values,
        )
        for page in pages:
            for item in page.get("Items", []):
                yield UnqueuedJob.from_item(from_item(item))

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

    def runner_started_job(
        self, instance_id: str, runner_id: int, project_id: int, job_id: int, at: float
    ) -> RunnerActivity | None:
        """A Job Hook says ``runner_id`` (on ``instance_id``) runs the job: the runner is busy, and no longer in the
        idle index. None when the record is not that runner's, is terminated, or already saw the job finish (hooks
        arrive in any order)."""
        job = f"{project_id}:{job_id}"
        old = self._runner_update(
            instance_id,
            "SET #state = :busy, first_job_at = if_not_exists(first_job_at, :at), updated_at = :at "
            "ADD busy :job REMOVE idle_pool, idle_since",
            {":busy": {"S": RunnerState.BUSY.value}, ":at": attribute_value(at), ":job": {"SS": [job]}},
            job,
            runner_id,
            "ALL_OLD",
        )
        if isinstance(old, _Refused):
            return None
        return RunnerActivity(
            instance_id=instance_id,
            pool=str(old.get("pool", "")),
            launched_at=float(old.get("launched_at", 0)),
            first_job="first_job_at" not in old,
        )

    def runner_finished_job(
        self, instance_id: str, runner_id: int, project_id: int, job_id: int, at: float
    ) -> RunnerFinish | None:
        """A Job Hook says the job ``runner_id`` ran has finished: one build more. A runner with builds left and no
        other job becomes idle, in the idle index; one at its last build is done. None when the record is not
        that runner's or counted the job already, or is terminated with no interruption recorded.

        An interrupted instance may be terminated (and its record with it) before GitLab's hook for the job it
        failed arrives: the refused write's old record, which comes back with the refusal at no extra call, still
        says the runner was interrupted while it ran the job."""
        job = f"{project_id}:{job_id}"
        new = self._runner_update(
            instance_id,
            "SET updated_at = :at ADD done :job, builds :one DELETE busy :job",
            {":at": attribute_value(at), ":job": {"SS": [job]}, ":one": {"N": "1"}},
            job,
            runner_id,
            "ALL_NEW",
        )
        if isinstance(new, _Refused):
            old = new.item
            if (
                old.get("state") == RunnerState.TERMINATED.value
                and "interrupted_at" in old
                and old.get("gitlab_runner_id") == runner_id
                and job in old.get("busy", set())
                and job not in old.get("done", set())
            ):
                return RunnerFinish(None, str(old.get("pool", "")), interrupted=True)
            return None
        finish = RunnerFinish(None, str(new.get("pool", "")), interrupted="interrupted_at" in new)
        if "busy" in new:
            return finish
        builds, max_builds = int(new.get("builds", 0)), int(new.get("max_builds", 0))
        if max_builds and builds >= max_builds:
            state, update = RunnerState.DONE, "SET #state = :state"
        elif "draining" in new:
            # Paused in GitLab: it takes no job, so it is not idle capacity for scale-up to count.
            state, update = RunnerState.IDLE, "SET #state = :state"
        else:
            state, update = RunnerState.IDLE, "SET #state = :state, idle_pool = :pool, idle_since = :at"
        values: dict[str, Any] = {
            ":state": {"S": state.value},
            ":at": attribute_value(at),
            ":pool": {"S": str(new.get("pool", ""))},
            ":builds": {"N": str(builds)},
            ":terminated": {"S": RunnerState.TERMINATED.value},
        }
        if "idle_pool" not in update:
            del values[":pool"], values[":at"]
        try:
            # Only if nothing moved since: no job started on it meanwhile, no other finish counted, not terminated.
            self._runner_write(
                TableName=self.table,
                Key={"pk": {"S": runner_key(instance_id)}},
                UpdateExpression=update,
                ConditionExpression="#state <> :terminated AND attribute_not_exists(busy) AND builds = :builds"
                + (" AND attribute_not_exists(draining)" if "idle_pool" in update else ""),
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            return finish
        return RunnerFinish(state, finish.pool, finish.interrupted)

    def _past_conflicts(self, write: Callable[[], _T]) -> _T:
        """One single-item write, tried again (``conflict_attempts`` in all) while it meets a transaction on its
        item (TransactionConflictException, which botocore does not retry). Other errors, and the last conflict,
        propagate."""
        for attempt in range(self.conflict_attempts):
            try:
                return write()
            except ClientError as exc:
                if error_code(exc) != "TransactionConflictException" or attempt + 1 == self.conflict_attempts:
                    raise
                self._sleep(conflict_backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _runner_write(self, **request: Any) -> dict[str, Any]:
        """One UpdateItem of a runner record, past transactions holding the record."""
        return dict(self._past_conflicts(lambda: self._client.update_item(**request)))

    def _runner_update(
        self, instance_id: str, update: str, values: dict[str, Any], job: str, runner_id: int, returned: str
    ) -> dict[str, Any] | _Refused:
        values = {
            **values,
            ":rid": attribute_value(runner_id),
            ":jobid": {"S": job},
            ":terminated": {"S": RunnerState.TERMINATED.value},
        }
        try:
            answer = self._runner_write(
                TableName=self.table,
                Key={"pk": {"S": runner_key(instance_id)}},
                UpdateExpression=update,
                ConditionExpression="gitlab_runner_id = :rid AND #state <> :terminated AND NOT contains(done, :jobid)",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues=values,
                ReturnValues=returned,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            item = exc.response.get("Item")
            return _Refused(from_item(item) if item else {})
        return from_item(answer.get("Attributes", {}))

    def record_hook(self, project_id: int, hook_id: int, gitlab_url: str, webhook_url: str) -> HookRecord:
        """Remember the hook that feeds the fleet from ``project_id`` (one per project: a reconnect replaces it)."""
        record = HookRecord(project_id, hook_id, gitlab_url, webhook_url, self._clock())
        self._client.put_item(TableName=self.table, Item=record.to_item())
        return record

    def get(self, pk: str, consistent: bool = True) -> dict[str, Any] | None:
        found = self._client.get_item(TableName=self.table, Key={"pk": {"S": pk}}, ConsistentRead=consistent)
        item = found.get("Item")
        return from_item(item) if item else None

    def scan(self, kind: str | None = None, projection: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
        """Every item (of one kind; only the ``projection`` attributes when given). For the operator's status view
        and the invariants, never on a Lambda hot path."""
        kwargs: dict[str, Any] = {"TableName": self.table}
        if kind is not None:
            kwargs["FilterExpression"] = "kind = :kind"
            kwargs["ExpressionAttributeValues"] = {":kind": {"S": kind}}
        if projection:
            kwargs["ProjectionExpression"] = ", ".join(f"#p{i}" for i in range(len(projection)))
            kwargs["ExpressionAttributeNames"] = {f"#p{i}": name for i, name in enumerate(projection)}
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
        values[LIVE_ATTRIBUTE] = None if event.status.finished else "job"
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
        if event.status is JobStatus.PENDING:
            # Not queued until the send succeeded, which this write claims; a job already queued is not recorded
            # (nor queued) again.
            assignments += ", #queued = :unqueued, queue_claim = :writer, queue_claim_at = :claimed"
            names["#queued"] = "queued"
            attribute_values[":writer"] = {"S": writer}
            attribute_values[":claimed"] = attribute_value(now)
            attribute_values[":unqueued"] = {"BOOL": False}
            attribute_values[":queued"] = {"BOOL": True}
            condition += " AND (attribute_not_exists(#queued) OR #queued <> :queued)"
        if replay_key is not None:
            attribute_values[":replay"] = {"S": replay_key}
            attribute_values[":replays"] = {"SS": [replay_key]}
            additions += ", replays :replays"
            condition += " AND NOT contains(replays, :replay)"
        removals = f" REMOVE {LIVE_ATTRIBUTE}" if event.status.finished else ""
        return {
            "TableName": self.table,
            "Key": {"pk": {"S": job_key(event.project_id, event.job_id)}},
            "UpdateExpression": f"SET {assignments} ADD {additions}{removals}",
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": attribute_values,
        }
