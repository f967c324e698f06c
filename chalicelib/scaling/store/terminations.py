"""A runner record's end: terminated exactly once, its lease back to the pool, cleanup marks until its token and
GitLab runner are deleted.

An instance terminated before its record was written gets a terminated tombstone instead, which refuses that
later write; its lease is still held by its launch, which gives it back.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from chalicelib.scaling.store.records import CLEANUP_PENDING, RunnerRecord, Termination
from chalicelib.scaling.store.table import (
    CONFLICT_ATTEMPTS,
    GIVE_BACK_ATTEMPTS,
    ScaleTable,
    cancellation_reasons,
    update_request,
)
from chalicelib.store import (
    FINISHED_JOB_TTL_SECONDS,
    LIVE_ATTRIBUTE,
    RunnerState,
    attribute_value,
    pool_key,
    runner_key,
    to_item,
)


class TerminationStore(ScaleTable):
    """Terminating runner records (or writing their tombstones), and clearing their cleanup marks."""

    def terminate_runner(self, instance_id: str, reason: str, *, pool: str = "") -> Termination:
        """Mark a runner terminated and give its lease back to the pool, exactly once.

        The terminated record keeps ``token_cleanup`` and ``gitlab_cleanup`` marks until :meth:`finish_cleanup`,
        so a retried or duplicate event finishes deleting whichever is left. An instance with no
        record yet (terminated between CreateFleet and its record write) gets a terminated tombstone, which
        refuses that later write; its lease is still held by its launch, which gives it back. ``pool``, when the
        caller knows it (reconcile reaping an instance no record knows, from its tag), goes on the tombstone, so
        that ``fleetctl status`` counts the reaping for its pool.
        """
        for _ in range(CONFLICT_ATTEMPTS):
            found = self.get(runner_key(instance_id))
            if found is None:
                if self._put_tombstone(instance_id, reason, pool):
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

    def _put_tombstone(self, instance_id: str, reason: str, pool: str) -> bool:
        now = self._clock()
        item: dict[str, Any] = {
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
        if pool:
            item["pool"] = pool
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
        runner_update = update_request(
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
                    "Update": update_request(
                        self.table,
                        pool_key(record.pool),
                        "ADD leases :minus",
                        {":minus": -1, ":one": 1},
                        "leases >= :one",
                    )
                }
            )
        refused = self._transact(writes, attempts=GIVE_BACK_ATTEMPTS) if record.lease else self._transact(writes)
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
            update_request(
                self.table,
                runner_key(instance_id),
                "REMOVE token_cleanup" + (f", gitlab_cleanup, {LIVE_ATTRIBUTE}" if gitlab else ""),
                {":t": RunnerState.TERMINATED.value},
                "#state = :t",
                names={"#state": "state"},
            ),
        )
