"""Runner records while their instance lives: written for a launch's instances, tied to their GitLab runner,
marked draining or retiring, read.

Each record is written right after CreateFleet, taking one lease from its launch in the same transaction, and
before any GitLab runner or token exists, so the state-change handler always finds what to clean up
(see :mod:`chalicelib.scaling.recording`). Its end is :mod:`chalicelib.scaling.store.terminations`.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.scaling.store.records import CLEANUP_PENDING, RunnerRecord
from chalicelib.scaling.store.table import ScaleTable, update_request
from chalicelib.store import LIVE_ATTRIBUTE, RETIRING, RunnerState, from_item, launch_key, runner_key


class RunnerStore(ScaleTable):
    """``RUNNER#`` items: recorded, given their GitLab identity, drained, retired, read."""

    def runners(self, instance_ids: list[str]) -> dict[str, RunnerRecord]:
        """Runner records by instance id, for those that exist (one BatchGetItem per 100)."""
        records = (RunnerRecord.from_item(item) for item in self._batch_get([runner_key(i) for i in instance_ids]))
        return {record.instance_id: record for record in records}

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
                "Update": update_request(
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
            update_request(
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
            update_request(
                self.table,
                runner_key(instance_id),
                "SET gitlab_runner_id = :id, gitlab_cleanup = :pending, updated_at = :now, #live = :runner",
                {":id": gitlab_runner_id, ":pending": CLEANUP_PENDING, ":now": self._clock(), ":runner": "runner"},
                names={"#live": LIVE_ATTRIBUTE},
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
        request = update_request(
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
        request = update_request(
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

    def undrain_runner(self, instance_id: str, reason: str) -> bool:
        """Clear the draining mark ``reason`` set (a retire given up because the runner took a job)."""
        return self._write_unless_refused(
            "update_item",
            update_request(
                self.table,
                runner_key(instance_id),
                "REMOVE draining, draining_at",
                {":reason": reason},
                "draining = :reason",
            ),
        )
