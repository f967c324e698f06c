"""A pool's capacity, counted by leases on its ``POOL#`` counter: taken for a launch, given back by it.

A launch takes its leases in the same transaction that writes its record, so no lease is ever held by nobody, and
gives back those it will not use (it made fewer instances) in the same transaction that lowers what its record
holds. Idle runners, which take a pool's next jobs by themselves, are counted here too, and a pool is drained here
(``fleetctl drain``): the mark sits on the same counter item scale-up reads for each launch, so it costs no read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.scaling.launches import LaunchEvent, LaunchState
from chalicelib.scaling.launches import update as launch_update
from chalicelib.scaling.store.launches import LaunchStore
from chalicelib.scaling.store.records import DRAINED_ATTRIBUTE, PoolCounter
from chalicelib.scaling.store.table import (
    CONFLICT_ATTEMPTS,
    GIVE_BACK_ATTEMPTS,
    ScaleTable,
    cancellation_reasons,
    transiently_cancelled,
    update_request,
)
from chalicelib.store import IDLE_RUNNERS_INDEX, LIVE_ATTRIBUTE, from_item, launch_key, pool_key, to_item


class CapacityStore(ScaleTable):
    """Pool counters: leases taken and given back by launches, and the idle runners of a pool."""

    def __init__(
        self,
        table: str,
        client: Any,
        launches: LaunchStore,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(table, client, clock, sleep)
        self._launches = launches

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
        for _ in range(CONFLICT_ATTEMPTS * 4):
            if take <= 0:
                return 0
            now = self._clock()
            writes = [
                {
                    "Update": update_request(
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
                landed = self._launches.get_launch(launch_id)
                return landed.requested if landed is not None else 0
            if refused is None:
                return take
            landed = self._launches.get_launch(launch_id)
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
        return self.pool_counter(pool).leases

    def pool_counter(self, pool: str) -> PoolCounter:
        """The pool's counter item, read consistently: its leases, template version and drain mark in one read."""
        return PoolCounter.from_item(pool, self.get(pool_key(pool)))

    def set_drained(self, pool: str, drained: bool) -> PoolCounter:
        """Drain the pool (scale-up then launches nothing for it and reconcile retires its runners) or undrain it;
        returns the counter as the write left it. Draining a drained pool keeps the time it was first drained."""
        if drained:
            expression = f"SET kind = :kind, #name = :name, #live = :kind, {DRAINED_ATTRIBUTE} = "
            expression += f"if_not_exists({DRAINED_ATTRIBUTE}, :now)"
            values: dict[str, Any] = {":kind": "pool", ":name": pool, ":now": self._clock()}
        else:
            expression = "SET kind = :kind, #name = :name, #live = :kind REMOVE " + DRAINED_ATTRIBUTE
            values = {":kind": "pool", ":name": pool}
        request = update_request(
            self.table, pool_key(pool), expression, values, names={"#name": "name", "#live": LIVE_ATTRIBUTE}
        )
        answer = self._past_conflicts(lambda: self._client.update_item(**request, ReturnValues="ALL_NEW"))
        return PoolCounter.from_item(pool, from_item(answer.get("Attributes", {})))

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
                self._launches.fail_launch(launch_id, reason)
            return
        event = LaunchEvent.RETURN_ALL if finished else LaunchEvent.RETURN_SOME
        move = launch_update(event, now=self._clock(), reason=reason or "failed", held=held, returned=count)
        launch_write = self._launches.launch_request(launch_id, move)
        pool_update = update_request(
            self.table, pool_key(pool), "ADD leases :minus", {":minus": -count, ":n": count}, "leases >= :n"
        )
        refused = self._transact([{"Update": launch_write}, {"Update": pool_update}], attempts=GIVE_BACK_ATTEMPTS)
        if refused is not None:
            landed = self._launches.get_launch(launch_id)
            if landed is None or landed.leases != held - count:
                raise refused
            # An earlier attempt of this very write landed.
