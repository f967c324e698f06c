"""The fleet table as scale-up and the instance-state handler use it: claims, leases, launches, runners.

Capacity is counted by leases. A pool's ``leases`` counter is the number of runners it has or is about to have;
it never exceeds max_runners because every increment is conditional. A lease is held first by a launch record
(taken in the same transaction that raises the pool's counter), then moved, one by one and in a transaction, to
the runner record of each instance the launch made, and finally given back when the instance is terminated or
the launch made fewer instances than it asked for. Each move is conditional, so a lease is never counted twice,
whatever crashes or retries happen in between.

Kept apart from :mod:`chalicelib.store`, which the webhook imports: the webhook Lambda compiles and loads only the
part of the table it uses (a Lambda writes no bytecode cache, so every module is compiled at each cold start).
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, TypeVar

from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.intake.job_hooks import JobStatus
from chalicelib.scaling.launches import LaunchEvent, LaunchState, LaunchUpdate
from chalicelib.scaling.launches import update as launch_update
from chalicelib.store import (
    FINISHED_JOB_TTL_SECONDS,
    FLEET_RECORDS_INDEX,
    IDLE_RUNNERS_INDEX,
    LIVE_ATTRIBUTE,
    QUEUE_CLAIM_SECONDS,
    RETIRING,
    TOKEN_DEADLINES_INDEX,
    TOKEN_INDEX_KEY,
    UNFINISHED_JOB_TTL_SECONDS,
    FleetStore,
    RunnerState,
    attribute_value,
    from_item,
    job_key,
    launch_key,
    pool_key,
    runner_key,
    to_item,
)

_CONFLICT_ATTEMPTS = 4
_T = TypeVar("_T")
# DynamoDB cancels a transaction that meets another one on an item (``TransactionConflict``), or that is throttled
# (``ThrottlingError``, ``ProvisionedThroughputExceeded``), and refuses a single-item write on an item a
# transaction holds (``TransactionConflictException``). botocore's standard retry mode retries none of these, so
# the store does, with jittered exponential backoff, a bounded number of times; the last failure is raised.
TRANSIENT_CANCELLATION_REASONS = frozenset({"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"})
_WRITE_ATTEMPTS = 8
_BACKOFF_BASE_SECONDS = 0.025
_BACKOFF_CAP_SECONDS = 1.0


def cancellation_reasons(exc: BaseException) -> list[str]:
    """The ``CancellationReasons`` codes of a TransactionCanceledException, one per action ("None" where that
    action was fine); [] for any other error."""
    if error_code(exc) != "TransactionCanceledException":
        return []
    response = getattr(exc, "response", {}) or {}
    return [str(reason.get("Code") or "None") for reason in response.get("CancellationReasons") or ()]


def transiently_cancelled(exc: BaseException) -> bool:
    """A transaction cancelled only for reasons a later attempt may not meet (a conflict, throttling), and for no
    failed condition: trying again is right, and taking it as "the condition said it is done" is wrong."""
    reasons = set(cancellation_reasons(exc))
    return bool(reasons & TRANSIENT_CANCELLATION_REASONS) and "ConditionalCheckFailed" not in reasons


def conflict_backoff(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1`` of a write that met a conflict: exponential, equal jitter."""
    step = min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2**attempt)
    return float(step / 2 + (rng or random).uniform(0, step / 2))


class ClaimOutcome(str, Enum):
    CLAIMED = "claimed"
    HELD = "held"  # another launch already holds the job
    NOT_PENDING = "not_pending"  # the webhooks already saw it start, finish or be cancelled
    DEAD_LETTERED = "dead_lettered"  # scale-up gave up on it; a copy of its message must not launch it again


# The value of a job item's ``outcome`` once scale-up has dead-lettered the job.
DEAD_LETTERED_OUTCOME = "dead_lettered"
# A terminated runner record carries ``token_cleanup`` / ``gitlab_cleanup`` with this value until its token / its
# GitLab runner is deleted.
CLEANUP_PENDING = "pending"


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    launch_id: str
    claimed_at: float = 0.0  # when the holding launch claimed the job (HELD only)


@dataclass(frozen=True)
class RunnerRecord:
    """A ``RUNNER#<instance id>`` item, typed. A tombstone (an instance terminated before it was recorded) has
    only its instance id, state and reason."""

    instance_id: str
    pool: str = ""
    launch_id: str = ""
    lifecycle: str = ""
    instance_type: str = ""
    subnet_id: str | None = None
    launched_at: float = 0.0
    boot_deadline_at: float = 0.0
    token_key: str = ""  # the fleet-table item holding its GitLab runner token (chalicelib.scaling.tokens)
    gitlab_runner_id: int | None = None
    state: RunnerState = RunnerState.BOOTING
    lease: bool = False  # holds one of its pool's leases
    tombstone: bool = False
    reason: str = ""
    token_cleanup: bool = False  # terminated, and its token may still exist
    gitlab_cleanup: bool = False  # terminated, and its GitLab runner may still exist
    max_builds: int = 0  # builds its runner takes before it powers off (0: not recorded)
    draining: str = ""  # why it is paused in GitLab and takes no new job ("" while it is not)
    draining_at: float = 0.0  # when it was marked draining
    busy: tuple[str, ...] = ()  # "<project>:<job>" of the jobs the Job Hooks say it runs
    first_job_at: float = 0.0
    warm: bool = False  # launched to keep its pool warm, not for a job
    # When EC2 first warned that its instance is to be interrupted (0: never), and the warnings it got.
    interrupted_at: float = 0.0
    interruptions: tuple[str, ...] = ()

    @property
    def terminated(self) -> bool:
        return self.state is RunnerState.TERMINATED

    @classmethod
    def from_item(cls, values: Mapping[str, Any]) -> RunnerRecord:
        runner_id = values.get("gitlab_runner_id")
        return cls(
            instance_id=str(values["instance_id"]),
            pool=str(values.get("pool", "")),
            launch_id=str(values.get("launch_id", "")),
            lifecycle=str(values.get("lifecycle", "")),
            instance_type=str(values.get("instance_type", "")),
            subnet_id=values.get("subnet_id"),
            launched_at=float(values.get("launched_at", 0)),
            boot_deadline_at=float(values.get("boot_deadline_at", 0)),
            token_key=str(values.get("token_key", "")),
            gitlab_runner_id=int(runner_id) if runner_id is not None else None,
            state=RunnerState(values.get("state", RunnerState.BOOTING.value)),
            lease=bool(values.get("lease", False)),
            tombstone=bool(values.get("tombstone", False)),
            reason=str(values.get("reason", "")),
            token_cleanup=values.get("token_cleanup") == CLEANUP_PENDING,
            gitlab_cleanup=values.get("gitlab_cleanup") == CLEANUP_PENDING,
            max_builds=int(values.get("max_builds", 0)),
            draining=str(values.get("draining", "")),
            draining_at=float(values.get("draining_at", 0)),
            busy=tuple(sorted(str(job) for job in values.get("busy", ()))),
            first_job_at=float(values.get("first_job_at", 0)),
            warm=bool(values.get("warm", False)),
            interrupted_at=float(values.get("interrupted_at", 0)),
            interruptions=tuple(sorted(str(kind) for kind in values.get("interruptions", ()))),
        )

    def new_item(self, now: float) -> dict[str, Any]:
        """The item of a runner just recorded: it holds its lease, and has no GitLab identity yet."""
        return to_item(
            {
                "pk": runner_key(self.instance_id),
                "kind": "runner",
                "instance_id": self.instance_id,
                "pool": self.pool,
                "launch_id": self.launch_id,
                "lifecycle": self.lifecycle,
                "instance_type": self.instance_type,
                "subnet_id": self.subnet_id,
                "launched_at": self.launched_at,
                "boot_deadline_at": self.boot_deadline_at,
                "token_key": self.token_key,
                "gitlab_runner_id": self.gitlab_runner_id,
                "state": self.state.value,
                "lease": True,
                "max_builds": self.max_builds or None,
                "warm": self.warm or None,
                "updated_at": now,
                LIVE_ATTRIBUTE: "runner",
            }
        )


@dataclass(frozen=True)
class LaunchRecord:
    """A ``LAUNCH#<launch id>`` item, typed."""

    launch_id: str
    pool: str
    state: LaunchState
    leases: int  # leases it holds now (each moves to a runner record as its instance is recorded)
    requested: int  # leases it took
    started_at: float  # when its current owner started on it
    reason: str = ""
    instances: tuple[str, ...] = ()
    plan: str = ""  # the CreateFleet requests it sends, as JSON (see chalicelib.scaling.fleet.LaunchPlan)

    @classmethod
    def from_item(cls, launch_id: str, values: Mapping[str, Any]) -> LaunchRecord:
        return cls(
            launch_id=launch_id,
            pool=str(values.get("pool", "")),
            state=LaunchState(values["state"]),
            leases=int(values.get("leases", 0)),
            requested=int(values.get("requested", 0)),
            started_at=float(values.get("started_at", 0)),
            reason=str(values.get("reason", "")),
            instances=tuple(str(i) for i in values.get("instances", ())),
            plan=str(values.get("plan", "")),
        )


@dataclass(frozen=True)
class Termination:
    """What terminating a runner record found: the record as it is now (None for a tombstone just written)."""

    record: RunnerRecord | None
    newly: bool  # this call terminated it (not a duplicate or late event)
    tombstone: bool  # the instance had no record: a tombstone stands in for it


def _update(
    table: str,
    pk: str,
    expression: str,
    values: Mapping[str, Any],
    condition: str | None = None,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    update: dict[str, Any] = {
        "TableName": table,
        "Key": {"pk": {"S": pk}},
        "UpdateExpression": expression,
        "ExpressionAttributeValues": {k: attribute_value(v) for k, v in values.items()},
    }
    if condition:
        update["ConditionExpression"] = condition
    if names:
        update["ExpressionAttributeNames"] = dict(names)
    return update


class ScaleStore(FleetStore):
    """The fleet table as scale-up and the instance-state handler use it."""

    def _transact(self, writes: list[dict[str, Any]]) -> ClientError | None:
        """One TransactWriteItems, tried again while DynamoDB cancels it only for a conflict or throttling.

        Returns None once it applied, or the TransactionCanceledException when it was cancelled for a reason
        another attempt does not change (a failed condition: the caller reads what is there and decides). Raises
        that exception when conflicts outlast the attempts, so the caller's event fails visibly and comes back,
        rather than be taken as done. Each attempt is a new call, with a new idempotency token: the cancelled
        one changed nothing.
        """
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                self._client.transact_write_items(TransactItems=writes)
            except ClientError as exc:
                if error_code(exc) != "TransactionCanceledException":
                    raise
                if not transiently_cancelled(exc):
                    return exc
                if attempt + 1 == _WRITE_ATTEMPTS:
                    raise
                self._sleep(conflict_backoff(attempt))
                continue
            return None
        raise AssertionError("unreachable")  # pragma: no cover

    def _past_conflicts(self, write: Callable[[], _T]) -> _T:
        """One single-item write, tried again while it meets a transaction on its item
        (TransactionConflictException, which botocore does not retry). Other errors, and the last conflict,
        propagate."""
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                return write()
            except ClientError as exc:
                if error_code(exc) != "TransactionConflictException" or attempt + 1 == _WRITE_ATTEMPTS:
                    raise
                self._sleep(conflict_backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _update_unless_refused(self, request: dict[str, Any]) -> dict[str, Any] | None:
        update = super()._update_unless_refused
        return self._past_conflicts(lambda: update(request))

    def _write(self, operation: str, request: Mapping[str, Any]) -> None:
        """A single-item write (``update_item`` or ``put_item``), past conflicts with transactions."""
        call = getattr(self._client, operation)
        self._past_conflicts(lambda: call(**request))

    def _write_unless_refused(self, operation: str, request: Mapping[str, Any]) -> bool:
        """A conditional single-item write, past conflicts with transactions: False when its condition refused it."""
        try:
            self._write(operation, request)
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            return False
        return True

    def claim_job(self, project_id: int, job_id: int, launch_id: str) -> Claim:
        """Tie a job to a launch, once: the conditional write that makes "one launch per job, ever" true.

        The same condition refuses a job whose record the webhooks have moved past pending (running, finished,
        cancelled), so a job that waited for capacity is checked at no extra call, and a job already
        dead-lettered, so a second copy of its message cannot launch it (or fail the same way) again.
        """
        now = self._clock()
        request = _update(
            self.table,
            job_key(project_id, job_id),
            "SET launch_id = :launch, claimed_at = :now, kind = :kind, project_id = :project, job_id = :job",
            {
                ":launch": launch_id,
                ":now": now,
                ":kind": "job",
                ":project": project_id,
                ":job": job_id,
                ":pending": JobStatus.PENDING.rank,
                ":dead": DEAD_LETTERED_OUTCOME,
            },
            "attribute_not_exists(launch_id) AND (attribute_not_exists(status_rank) OR status_rank <= :pending)"
            " AND (attribute_not_exists(outcome) OR outcome <> :dead)",
        )
        old = self._update_unless_refused(request)
        if old is None or old.get("launch_id") == launch_id:
            # (The second: refused by our own write, which landed before botocore retried the timed-out call.)
            return Claim(ClaimOutcome.CLAIMED, launch_id)
        if old.get("outcome") == DEAD_LETTERED_OUTCOME:
            return Claim(ClaimOutcome.DEAD_LETTERED, "")
        if old.get("launch_id"):
            return Claim(ClaimOutcome.HELD, str(old["launch_id"]), float(old.get("claimed_at", 0)))
        return Claim(ClaimOutcome.NOT_PENDING, "")

    def release_claim(self, project_id: int, job_id: int, launch_id: str) -> None:
        """Untie a job from a launch that will not run it, so a later attempt can claim it again."""
        try:
            self._client.update_item(
                **_update(
                    self.table,
                    job_key(project_id, job_id),
                    "REMOVE launch_id, claimed_at",
                    {":launch": launch_id},
                    "launch_id = :launch",
                )
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise

    def release_for_relaunch(self, project_id: int, job_id: int, launch_id: str) -> str | None:
        """Untie a pending job from a launch that ended without a runner taking it, and in the same write make it a
        pending job waiting to be queued, under a queue claim: returns the claim (for :meth:`mark_queued` once
        the send succeeded, or :meth:`release_queue_claim` if it failed), or None when the launch no longer holds
        it. Whatever happens after this write, the job is found again: queued, or unqueued pending (reconcile
        queues those), never claimed by nothing."""
        claim = uuid.uuid4().hex
        now = self._clock()
        landed = self._write_unless_refused(
            "update_item",
            _update(
                self.table,
                job_key(project_id, job_id),
                "SET #queued = :no, queue_claim = :claim, queue_claim_at = :now, updated_at = :now"
                " REMOVE launch_id, claimed_at",
                {":launch": launch_id, ":no": False, ":claim": claim, ":now": now},
                "launch_id = :launch",
                names={"#queued": "queued"},
            ),
        )
        return claim if landed else None

    def mark_job(self, project_id: int, job_id: int, outcome: str, **fields: Any) -> None:
        """Record what scale-up decided for a job (unmatched, not pending, dead-lettered ...)."""
        values = {
            "outcome": outcome,
            "outcome_at": self._clock(),
            "kind": "job",
            "project_id": project_id,
            "job_id": job_id,
            **{k: v for k, v in fields.items() if v is not None},
        }
        names = {f"#f{i}": k for i, k in enumerate(values)}
        expression = "SET " + ", ".join(f"#f{i} = :f{i}" for i in range(len(values)))
        self._client.update_item(
            **_update(
                self.table,
                job_key(project_id, job_id),
                expression,
                {f":f{i}": v for i, v in enumerate(values.values())},
                names=names,
            )
        )

    def mark_job_dead_lettered(self, project_id: int, job_id: int, reason: str, error_code: str = "") -> None:
        """Record that scale-up gave up on a job; :meth:`claim_job` refuses it from then on."""
        self.mark_job(project_id, job_id, DEAD_LETTERED_OUTCOME, reason=reason, error_code=error_code or None)

    def acquire_leases(
        self,
        pool: str,
        wanted: int,
        max_runners: int,
        launch_id: str,
        plan: Callable[[int], str] | None = None,
    ) -> int:
        """Take up to ``wanted`` leases of a pool for a new launch; returns how many were granted (maybe 0: the pool
        is full, or other writes kept meeting this one on the pool's counter past every attempt).

        The pool counter's increment and the launch record that holds the leases are one transaction, so a crash
        can never leave leases that nobody holds. ``plan(granted)`` gives what the launch will send to EC2, kept
        on the record in the same write, so whoever resumes the launch sends exactly that.
        """
        # Never ask for more than the pool holds: a pool without a counter yet passes the condition below.
        take = min(wanted, max_runners)
        for _ in range(_CONFLICT_ATTEMPTS * 4):
            if take <= 0:
                return 0
            now = self._clock()
            writes = [
                {
                    "Update": _update(
                        self.table,
                        pool_key(pool),
                        "SET kind = :kind, #name = :name, #live = :kind ADD leases :take",
                        {":kind": "pool", ":name": pool, ":take": take, ":limit": max_runners - take},
                        "attribute_not_exists(leases) OR leases <= :limit",
                        names={"#name": "name", "#live": LIVE_ATTRIBUTE},
                    )
                },
                {
                    "Put": {
                        "TableName": self.table,
                        "Item": to_item(
                            {
                                "pk": launch_key(launch_id),
                                "kind": "launch",
                                "pool": pool,
                                "leases": take,
                                "requested": take,
                                "state": LaunchState.LAUNCHING.value,
                                "started_at": now,
                                "plan": plan(take) if plan else None,
                                LIVE_ATTRIBUTE: "launch",
                            }
                        ),
                        "ConditionExpression": "attribute_not_exists(pk)",
                    }
                },
            ]
            try:
                refused = self._transact(writes)
            except ClientError as exc:
                if not transiently_cancelled(exc):
                    raise
                # Other launches and terminations kept meeting this one on the pool's counter past every attempt
                # (a hot counter in a burst). Nothing was taken: the jobs wait for capacity and ask again soon,
                # rather than fail the batch back to SQS for a whole visibility timeout.
                landed = self.get_launch(launch_id)
                return landed.requested if landed is not None else 0
            if refused is None:
                return take
            landed = self.get_launch(launch_id)
            if landed is not None:
                # An earlier attempt of this transaction (retried after a timeout) already took the leases.
                return landed.requested
            if cancellation_reasons(refused)[:1] != ["ConditionalCheckFailed"]:
                raise refused
            # The pool has less room than the counter showed: ask for what is left.
            current = int((self.get(pool_key(pool)) or {}).get("leases", 0))
            take = min(wanted, max_runners - current)
        # The counter kept moving under us: no room was found this time, and the jobs wait for capacity.
        return 0

    def leases(self, pool: str) -> int:
        return int((self.get(pool_key(pool)) or {}).get("leases", 0))

    def idle_runners(self, pool: str, limit: int) -> int:
        """How many of the pool's runners are idle with builds left (up to ``limit``): one Query of the sparse
        idle index, which trails the table by a moment (GSIs are eventually consistent)."""
        if limit <= 0:
            return 0
        answer = self._client.query(
            TableName=self.table,
            IndexName=IDLE_RUNNERS_INDEX,
            KeyConditionExpression="idle_pool = :pool",
            ExpressionAttributeValues={":pool": {"S": pool}},
            Select="COUNT",
            Limit=limit,
        )
        return int(answer.get("Count", 0))

    def give_back_launch_leases(
        self, launch_id: str, pool: str, held: int, count: int, *, finished: bool = False, reason: str = ""
    ) -> None:
        """Return ``count`` of the ``held`` leases a launch holds but will not use (it made fewer instances).

        ``finished`` marks the launch failed (it holds nothing any more and runs no job), with ``reason``.
        Compare-and-set on the exact count held, so the write cannot land twice: botocore retries a timed-out
        transaction, and only real DynamoDB (not every stand-in) honours the idempotency token it carries.
        """
        if count <= 0:
            if finished:
                self.fail_launch(launch_id, reason)
            return
        event = LaunchEvent.RETURN_ALL if finished else LaunchEvent.RETURN_SOME
        move = launch_update(event, now=self._clock(), reason=reason or "failed", held=held, returned=count)
        launch_write = self._launch_request(launch_id, move)
        pool_update = _update(
            self.table, pool_key(pool), "ADD leases :minus", {":minus": -count, ":n": count}, "leases >= :n"
        )
        refused = self._transact([{"Update": launch_write}, {"Update": pool_update}])
        if refused is not None:
            landed = self.get_launch(launch_id)
            if landed is None or landed.leases != held - count:
                raise refused
            # An earlier attempt of this very write landed.

    def get_launch(self, launch_id: str) -> LaunchRecord | None:
        found = self.get(launch_key(launch_id))
        return LaunchRecord.from_item(launch_id, found) if found else None

    def _launch_request(self, launch_id: str, move: LaunchUpdate) -> dict[str, Any]:
        return _update(
            self.table, launch_key(launch_id), move.expression, move.values, move.condition or None, move.names
        )

    def _move_launch(self, launch_id: str, move: LaunchUpdate) -> bool:
        """One launch-record move (chalicelib.scaling.launches); False when the record's state does not allow it."""
        return self._write_unless_refused("update_item", self._launch_request(launch_id, move))

    def finish_launch(self, launch_id: str, instance_ids: list[str]) -> bool:
        """Every runner the launch made is ready. It stays in the live index until reconcile sees it holds
        nothing (chalicelib.scaling.launches). False when it was no longer its owner's (reconcile settled it)."""
        return self._move_launch(
            launch_id, launch_update(LaunchEvent.FINISH, now=self._clock(), instances=tuple(instance_ids))
        )

    def fail_launch(self, launch_id: str, reason: str) -> bool:
        """The launch stops with ``reason``; any leases it still holds are given back by reconcile."""
        return self._move_launch(launch_id, launch_update(LaunchEvent.FAIL, now=self._clock(), reason=reason))

    def runners(self, instance_ids: list[str]) -> dict[str, RunnerRecord]:
        """Runner records by instance id, for those that exist (one BatchGetItem per 100)."""
        records = (RunnerRecord.from_item(item) for item in self._batch_get([runner_key(i) for i in instance_ids]))
        return {record.instance_id: record for record in records}

    def jobs_needing_no_launch(self, jobs: list[tuple[int, int]]) -> set[tuple[int, int]]:
        """Of ``(project id, job id)`` pairs, those whose record says no launch is due: settled (an outcome such as
        dead-lettered or not pending), past pending, or claimed by a launch that made its runner."""
        settled: set[tuple[int, int]] = set()
        by_launch: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for item in self._batch_get([job_key(project, job) for project, job in jobs]):
            pair = (int(item["project_id"]), int(item["job_id"]))
            if "outcome" in item or int(item.get("status_rank", 0)) > JobStatus.PENDING.rank:
                settled.add(pair)
            elif item.get("launch_id"):
                by_launch[str(item["launch_id"])].append(pair)
        for launch in self._batch_get([launch_key(launch_id) for launch_id in by_launch]):
            if launch.get("state") == LaunchState.LAUNCHED.value:
                settled.update(by_launch[str(launch["pk"]).removeprefix(launch_key(""))])
        return settled

    def _batch_get(self, keys: list[str]) -> list[dict[str, Any]]:
        """The items of these keys that exist, read consistently (one BatchGetItem per 100)."""
        found: list[dict[str, Any]] = []
        for start in range(0, len(keys), 100):
            chunk = [{"pk": {"S": key}} for key in keys[start : start + 100]]
            request: dict[str, Any] = {self.table: {"Keys": chunk, "ConsistentRead": True}}
            while request:
                answer = self._client.batch_get_item(RequestItems=request)
                found += [from_item(item) for item in answer.get("Responses", {}).get(self.table, [])]
                request = answer.get("UnprocessedKeys") or {}
        return found

    def record_runners(self, launch_id: str, runners: list[RunnerRecord]) -> set[str]:
        """Create runner records, moving one lease each from the launch to the runner, in transactions.

        Returns the instance ids refused because their instance was already terminated (the state-change
        handler left a tombstone): their leases stay with the launch, for the caller to give back.
        """
        refused: set[str] = set()
        pending = list(runners)
        while pending:
            chunk, pending = pending[:99], pending[99:]
            landed, dead = self._record_chunk(launch_id, chunk)
            refused |= dead
            retry = [r for r in chunk if r.instance_id not in landed and r.instance_id not in dead]
            pending = retry + pending
        return refused

    def _record_chunk(self, launch_id: str, chunk: list[RunnerRecord]) -> tuple[set[str], set[str]]:
        """One transaction: (ids recorded, ids refused because terminated); the caller records the rest again."""
        now = self._clock()
        writes: list[dict[str, Any]] = [
            {
                "Put": {
                    "TableName": self.table,
                    "Item": r.new_item(now),
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            }
            for r in chunk
        ]
        writes.append(
            {
                "Update": _update(
                    self.table,
                    launch_key(launch_id),
                    "SET leases = leases - :n",
                    {":n": len(chunk)},
                    "leases >= :n",
                )
            }
        )
        refused = self._transact(writes)
        if refused is None:
            return {r.instance_id for r in chunk}, set()
        recorded = self.runners([r.instance_id for r in chunk])
        ours = {i for i, r in recorded.items() if r.launch_id == launch_id}
        dead = {i for i, r in recorded.items() if r.launch_id != launch_id and r.tombstone}
        if ours and len(ours) == len(chunk):
            # An earlier attempt of this transaction (retried after a timeout) landed.
            return ours, set()
        if not dead or ours:
            raise refused
        # Instances terminated before they were recorded: the others are recorded without them.
        return set(), dead

    def set_runner_identity(self, instance_id: str, gitlab_runner_id: int) -> bool:
        """Tie a runner record to its GitLab runner; False when the instance was terminated meanwhile.

        The condition is what closes the race with the state-change handler: once it has terminated the record,
        no identity lands on it, so the caller knows to delete the GitLab runner and token it just made.
        """
        old = self._update_unless_refused(
            _update(
                self.table,
                runner_key(instance_id),
                "SET gitlab_runner_id = :id, updated_at = :now",
                {":id": gitlab_runner_id, ":now": self._clock(), ":terminated": RunnerState.TERMINATED.value},
                "attribute_exists(pk) AND #state <> :terminated",
                names={"#state": "state"},
            )
        )
        # Refused by our own write, which landed before botocore retried the timed-out call, still counts.
        if old is None:
            return True
        landed = RunnerRecord.from_item(old) if old.get("instance_id") else None
        return landed is not None and landed.gitlab_runner_id == gitlab_runner_id and not landed.terminated

    def note_orphan_runner(self, instance_id: str, gitlab_runner_id: int) -> None:
        """A GitLab runner made for an instance terminated meanwhile, which could not be deleted at once.

        Kept on the terminated record with the cleanup mark (and back in the live index), for a retried event or
        reconcile to delete.
        """
        self._write(
            "update_item",
            _update(
                self.table,
                runner_key(instance_id),
                "SET gitlab_runner_id = :id, gitlab_cleanup = :pending, updated_at = :now, #live = :runner",
                {":id": gitlab_runner_id, ":pending": CLEANUP_PENDING, ":now": self._clock(), ":runner": "runner"},
                names={"#live": LIVE_ATTRIBUTE},
            ),
        )

    def terminate_runner(self, instance_id: str, reason: str) -> Termination:
        """Mark a runner terminated and give its lease back to the pool, exactly once.

        The terminated record keeps ``token_cleanup`` and ``gitlab_cleanup`` marks until :meth:`finish_cleanup`,
        so a retried or duplicate event finishes deleting whichever is left. An instance with no
        record yet (terminated between CreateFleet and its record write) gets a terminated tombstone, which
        refuses that later write; its lease is still held by its launch, which gives it back.
        """
        for _ in range(_CONFLICT_ATTEMPTS):
            found = self.get(runner_key(instance_id))
            if found is None:
                if self._put_tombstone(instance_id, reason):
                    return Termination(None, newly=True, tombstone=True)
                continue  # the record was written meanwhile: terminate it
            record = RunnerRecord.from_item(found)
            if record.terminated:
                return Termination(record, newly=False, tombstone=record.tombstone)
            if self._terminate(record, reason):
                terminated = replace(
                    record,
                    state=RunnerState.TERMINATED,
                    lease=False,
                    reason=reason,
                    token_cleanup=True,
                    gitlab_cleanup=True,
                )
                return Termination(terminated, newly=True, tombstone=False)
        raise RuntimeError(f"runner record {instance_id} kept changing while it was terminated")

    def _put_tombstone(self, instance_id: str, reason: str) -> bool:
        now = self._clock()
        item = {
            "pk": runner_key(instance_id),
            "kind": "runner",
            "instance_id": instance_id,
            "state": RunnerState.TERMINATED.value,
            "tombstone": True,
            "reason": reason,
            "terminated_at": now,
            "updated_at": now,
            "ttl": int(now) + FINISHED_JOB_TTL_SECONDS,
        }
        if self._write_unless_refused(
            "put_item",
            {"TableName": self.table, "Item": to_item(item), "ConditionExpression": "attribute_not_exists(pk)"},
        ):
            return True
        found = self.get(runner_key(instance_id)) or {}
        # Refused by our own landed write (a retried call) still counts.
        return bool(found.get("tombstone"))

    def _terminate(self, record: RunnerRecord, reason: str) -> bool:
        instance_id = record.instance_id
        now = self._clock()
        runner_update = _update(
            self.table,
            runner_key(instance_id),
            "SET #state = :terminated, reason = :reason, terminated_at = :now, updated_at = :now, #ttl = :ttl, "
            "token_cleanup = :pending, gitlab_cleanup = :pending REMOVE lease, idle_pool, idle_since",
            {
                ":terminated": RunnerState.TERMINATED.value,
                ":reason": reason,
                ":now": now,
                ":ttl": int(now) + FINISHED_JOB_TTL_SECONDS,
                ":pending": CLEANUP_PENDING,
            },
            "#state <> :terminated",
            names={"#state": "state", "#ttl": "ttl"},
        )
        if record.gitlab_runner_id is None:
            # Scale-up may be setting the identity right now: then this write is refused, the record read again,
            # and the GitLab runner it names deleted. Otherwise that runner would be known to nobody.
            runner_update["ConditionExpression"] += " AND attribute_not_exists(gitlab_runner_id)"
        writes: list[dict[str, Any]] = [{"Update": runner_update}]
        if record.lease:
            runner_update["ConditionExpression"] += " AND lease = :true"
            runner_update["ExpressionAttributeValues"][":true"] = attribute_value(True)
            writes.append(
                {
                    "Update": _update(
                        self.table,
                        pool_key(record.pool),
                        "ADD leases :minus",
                        {":minus": -1, ":one": 1},
                        "leases >= :one",
                    )
                }
            )
        refused = self._transact(writes)
        if refused is None:
            return True
        if "ConditionalCheckFailed" in cancellation_reasons(refused):
            # The record is not as read: a concurrent event (or our own landed attempt) terminated it, or an
            # identity landed on it. Read it again.
            return False
        # Cancelled for another reason: the record and lease are untouched, and nothing says it is terminated.
        raise refused

    def finish_cleanup(self, instance_id: str, *, gitlab: bool = True) -> None:
        """The token (and, with ``gitlab``, the GitLab runner) of a terminated runner are gone: clear the marks."""
        self._write(
            "update_item",
            _update(
                self.table,
                runner_key(instance_id),
                "REMOVE token_cleanup" + (f", gitlab_cleanup, {LIVE_ATTRIBUTE}" if gitlab else ""),
                {":t": RunnerState.TERMINATED.value},
                "#state = :t",
                names={"#state": "state"},
            ),
        )

    def drain_runner(
        self,
        instance_id: str,
        reason: str,
        *,
        only_idle: bool = False,
        interruption: str | None = None,
        interrupted: bool = True,
    ) -> RunnerRecord | None:
        """Mark a runner draining (paused in GitLab, taking no new job) and take it out of the idle index.

        With ``only_idle``, only a runner the Job Hooks say runs nothing (idle, or booted and never given a job),
        not draining already, is marked: the conditional write is what a running Job Hook races. With
        ``interruption`` (the kind of EC2 warning), the same write records the kind in ``interruptions`` (a
        runner already marked for that kind is refused, which is how a duplicate event is told from a new one)
        and, when ``interrupted`` (a warning that the instance will be taken, not a recommendation that it may
        be), that the instance is being interrupted (``interrupted_at``, kept from the first warning), so that a
        job its runner then fails can be recognised. Returns the record as marked, or None when it was
        refused (terminated, done, with ``only_idle`` not idle, or with ``interruption`` marked for it already).
        """
        condition = "attribute_exists(pk) AND #state IN (:booting, :idle, :busy)"
        if only_idle:
            condition += (
                " AND #state IN (:booting, :idle) AND attribute_not_exists(busy) AND attribute_not_exists(draining)"
            )
        expression = "SET draining = :reason, draining_at = :now, updated_at = :now"
        values: dict[str, Any] = {
            ":reason": reason,
            ":now": self._clock(),
            ":booting": RunnerState.BOOTING.value,
            ":idle": RunnerState.IDLE.value,
            ":busy": RunnerState.BUSY.value,
        }
        if interruption is not None:
            if interrupted:
                expression += ", interrupted_at = if_not_exists(interrupted_at, :now)"
            expression += " ADD interruptions :kinds"
            condition += " AND NOT contains(interruptions, :kind)"
            values[":kind"] = interruption
            values[":kinds"] = {interruption}
        request = _update(
            self.table,
            runner_key(instance_id),
            expression + " REMOVE idle_pool, idle_since",
            values,
            condition,
            names={"#state": "state"},
        )
        return self._update_runner(request)

    def mark_retiring(self, instance_id: str, reason: str) -> RunnerRecord | None:
        """Mark a live runner retiring (draining, with ``retiring: <reason>``), busy or idle: refused (None) when it
        drains for another reason (an interruption) or is gone. Marking one that is retiring already is allowed,
        and keeps the first mark's time."""
        request = _update(
            self.table,
            runner_key(instance_id),
            "SET draining = if_not_exists(draining, :reason), draining_at = if_not_exists(draining_at, :now),"
            " updated_at = :now REMOVE idle_pool, idle_since",
            {
                ":reason": RETIRING + reason,
                ":prefix": RETIRING,
                ":now": self._clock(),
                ":booting": RunnerState.BOOTING.value,
                ":idle": RunnerState.IDLE.value,
                ":busy": RunnerState.BUSY.value,
            },
            "attribute_exists(pk) AND #state IN (:booting, :idle, :busy)"
            " AND (attribute_not_exists(draining) OR begins_with(draining, :prefix))",
            names={"#state": "state"},
        )
        return self._update_runner(request)

    def _update_runner(self, request: dict[str, Any]) -> RunnerRecord | None:
        """A conditional update of a runner record (past transaction conflicts): the record as written, or None
        when its condition refused it."""
        request["ReturnValues"] = "ALL_NEW"
        try:
            answer = self._past_conflicts(lambda: self._client.update_item(**request))
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            return None
        return RunnerRecord.from_item(from_item(answer["Attributes"]))

    def runner(self, instance_id: str) -> RunnerRecord | None:
        """A runner record (a tombstone too), read consistently; None when there is none."""
        found = self.get(runner_key(instance_id))
        return RunnerRecord.from_item(found) if found else None

    def claim_interruption_retry(self, project_id: int, job_id: int, claim: str) -> bool:
        """Take the one retry an interrupted job gets, for ``claim`` (the message asking for it): True when it is
        this claim's to make, now or again (the message came back after a failed attempt), False when another
        claim took it or the retry was made. The job's record must exist: the webhook recorded its failure
        before asking."""
        request = _update(
            self.table,
            job_key(project_id, job_id),
            "SET interruption_retry = if_not_exists(interruption_retry, :claim), interruption_retry_at = :now",
            {":claim": claim, ":now": self._clock()},
            "attribute_exists(pk) AND attribute_not_exists(interruption_retry_job)"
            " AND (attribute_not_exists(interruption_retry) OR interruption_retry = :claim)",
        )
        return self._update_unless_refused(request) is None

    def record_interruption_retry(self, project_id: int, job_id: int, new_job_id: int | None) -> None:
        """The retry of an interrupted job was made: GitLab's new job (None: GitLab no longer knew the job)."""
        self._write(
            "update_item",
            _update(
                self.table,
                job_key(project_id, job_id),
                "SET interruption_retry_job = :new",
                {":new": new_job_id if new_job_id is not None else 0},
                "attribute_exists(interruption_retry)",
            ),
        )

    def undrain_runner(self, instance_id: str, reason: str) -> bool:
        """Clear the draining mark ``reason`` set (a retire given up because the runner took a job)."""
        return self._write_unless_refused(
            "update_item",
            _update(
                self.table,
                runner_key(instance_id),
                "REMOVE draining, draining_at",
                {":reason": reason},
                "draining = :reason",
            ),
        )

    def unmark_launch(self, launch_id: str) -> bool:
        """A finished launch that holds no lease any more leaves the live index."""
        return self._move_launch(launch_id, launch_update(LaunchEvent.UNMARK, now=self._clock()))

    def tokens_due_before(self, now: float) -> Iterator[tuple[str, float]]:
        """(key, boot deadline) of the runner tokens whose deadline passed before ``now``: one paginated Query of
        the keys-only ``token-deadlines`` index, so no token value is read."""
        pages = self._client.get_paginator("query").paginate(
            TableName=self.table,
            IndexName=TOKEN_DEADLINES_INDEX,
            KeyConditionExpression="token_index = :token AND token_due < :now",
            ExpressionAttributeValues={":token": {"S": TOKEN_INDEX_KEY}, ":now": attribute_value(now)},
        )
        for page in pages:
            for item in page.get("Items", []):
                found = from_item(item)
                yield str(found["pk"]), float(found["token_due"])

    def live_records(self, kind: str) -> Iterator[dict[str, Any]]:
        """The items of one kind in the sparse ``fleet-records`` index (see :data:`FLEET_RECORDS_INDEX`): one
        paginated Query, eventually consistent like every GSI read."""
        pages = self._client.get_paginator("query").paginate(
            TableName=self.table,
            IndexName=FLEET_RECORDS_INDEX,
            KeyConditionExpression="#live = :kind",
            ExpressionAttributeNames={"#live": LIVE_ATTRIBUTE},
            ExpressionAttributeValues={":kind": {"S": kind}},
        )
        for page in pages:
            for item in page.get("Items", []):
                yield from_item(item)

    def claim_for_sweep(self, project_id: int, job_id: int, pipeline_id: int | None = None) -> str | None:
        """Take the queue claim of a pending job a sweep found: one the table does not know (its item is written
        now, pending and unqueued), one recorded as created whose pending Job Hook never came, or one recorded but
        never queued whose claim is free. Returns the claim, to
        pass to :meth:`mark_queued` after the send (or :meth:`release_queue_claim` if it fails), or None when
        the job is known otherwise (queued, claimed by a live sender, launched or settled)."""
        now = self._clock()
        claim = uuid.uuid4().hex
        values: dict[str, Any] = {
            ":claim": {"S": claim},
            ":now": attribute_value(now),
            ":stale": attribute_value(now - QUEUE_CLAIM_SECONDS),
            ":no": {"BOOL": False},
            ":job": {"S": "job"},
            ":pending": {"S": JobStatus.PENDING.value},
            ":rank": attribute_value(JobStatus.PENDING.rank),
            ":project": attribute_value(project_id),
            ":jobid": attribute_value(job_id),
            ":ttl": attribute_value(int(now) + UNFINISHED_JOB_TTL_SECONDS),
        }
        # The condition keeps the job at pending or before (created: its pending Job Hook was the one lost), so
        # pending is what it is now.
        assignments = (
            "kind = :job, project_id = :project, job_id = :jobid, #status = :pending, "
            "status_rank = :rank, pending_at = if_not_exists(pending_at, :now), "
            "#queued = :no, queue_claim = :claim, queue_claim_at = :now, updated_at = :now, #live = :job, "
            "#ttl = if_not_exists(#ttl, :ttl)"
        )
        if pipeline_id is not None:
            assignments += ", pipeline_id = if_not_exists(pipeline_id, :pipeline)"
            values[":pipeline"] = attribute_value(pipeline_id)
        request = {
            "TableName": self.table,
            "Key": {"pk": {"S": job_key(project_id, job_id)}},
            "UpdateExpression": f"SET {assignments}",
            "ConditionExpression": (
                "attribute_not_exists(pk) OR (status_rank <= :rank"
                " AND (attribute_not_exists(#queued) OR #queued = :no)"
                " AND attribute_not_exists(launch_id) AND attribute_not_exists(outcome)"
                " AND (attribute_not_exists(queue_claim) OR queue_claim_at < :stale))"
            ),
            "ExpressionAttributeNames": {
                "#status": "status",
                "#queued": "queued",
                "#live": LIVE_ATTRIBUTE,
                "#ttl": "ttl",
            },
            "ExpressionAttributeValues": values,
        }
        refused = self._update_unless_refused(request)
        return claim if refused is None or refused.get("queue_claim") == claim else None

    def take_run_lease(self, name: str, owner: str, seconds: float) -> bool:
        """Hold the lease ``name`` (one reconcile run at a time) for ``seconds``, unless another owner holds it."""
        now = self._clock()
        item = {"pk": f"LEASE#{name}", "kind": "lease", "owner": owner, "expires_at": now + seconds}
        item["ttl"] = int(now + seconds) + 3600
        return self._write_unless_refused(
            "put_item",
            {
                "TableName": self.table,
                "Item": to_item(item),
                "ConditionExpression": "attribute_not_exists(pk) OR expires_at < :now OR #owner = :owner",
                "ExpressionAttributeNames": {"#owner": "owner"},
                "ExpressionAttributeValues": {":now": attribute_value(now), ":owner": {"S": owner}},
            },
        )

    def release_run_lease(self, name: str, owner: str) -> None:
        self._write_unless_refused(
            "delete_item",
            {
                "TableName": self.table,
                "Key": {"pk": {"S": f"LEASE#{name}"}},
                "ConditionExpression": "#owner = :owner",
                "ExpressionAttributeNames": {"#owner": "owner"},
                "ExpressionAttributeValues": {":owner": {"S": owner}},
            },
        )

    def mark_launch_incomplete(self, launch_id: str, reason: str = "") -> bool:
        """The invocation ends with work left (runners unfinished, an answer lost): the next delivery of its jobs
        resumes it. False when it may not be resumed any more (reconcile settled it: it failed)."""
        return self._move_launch(
            launch_id, launch_update(LaunchEvent.PAUSE, now=self._clock(), reason=reason or "incomplete")
        )

    def take_over_launch(self, launch_id: str, stale_before: float) -> bool:
        """Become the one invocation resuming a launch: it is incomplete, or its last owner went silent."""
        return self._move_launch(
            launch_id, launch_update(LaunchEvent.TAKE_OVER, now=self._clock(), stale_before=stale_before)
        )
