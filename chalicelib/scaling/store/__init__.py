"""The fleet table as scale-up, the lifecycle handlers and reconcile use it: claims, leases, launches, runners.

Capacity is counted by leases. A pool's ``leases`` counter is the number of runners it has or is about to have;
it never exceeds max_runners because every increment is conditional. A lease is held first by a launch record
(taken in the same transaction that raises the pool's counter), then moved, one by one and in a transaction, to
the runner record of each instance the launch made, and finally given back when the instance is terminated or
the launch made fewer instances than it asked for. Each move is conditional, so a lease is never counted twice,
whatever crashes or retries happen in between.

The table's writes are split by the record they move, one store each: job claims
(:mod:`chalicelib.scaling.store.claims`), pool counters (:mod:`chalicelib.scaling.store.capacity`), launch
records (:mod:`chalicelib.scaling.store.launches`), runner records (:mod:`chalicelib.scaling.store.runners`) and
their end (:mod:`chalicelib.scaling.store.terminations`). Each is a
:class:`~chalicelib.scaling.store.table.ScaleTable` on the same table and client; :class:`ScaleStore` holds them
together, with what reconcile reads across every kind of record (the live index, tokens past their deadline) and
its run lease.

Kept apart from :mod:`chalicelib.store`, which the webhook imports: the webhook Lambda compiles and loads only the
part of the table it uses (a Lambda writes no bytecode cache, so every module is compiled at each cold start).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from chalicelib.scaling.store.capacity import CapacityStore
from chalicelib.scaling.store.claims import ClaimStore
from chalicelib.scaling.store.launches import LaunchStore
from chalicelib.scaling.store.runners import RunnerStore
from chalicelib.scaling.store.table import ScaleTable
from chalicelib.scaling.store.terminations import TerminationStore
from chalicelib.store import (
    FLEET_RECORDS_INDEX,
    LIVE_ATTRIBUTE,
    TOKEN_DEADLINES_INDEX,
    TOKEN_INDEX_KEY,
    attribute_value,
    from_item,
    to_item,
)


class ScaleStore(ScaleTable):
    """The fleet table as scale-up, the lifecycle handlers and reconcile use it: one store per record it moves."""

    def __init__(
        self,
        table: str,
        client: Any,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(table, client, clock, sleep)
        self.claims = ClaimStore(table, client, clock, sleep)
        self.launches = LaunchStore(table, client, clock, sleep)
        self.capacity = CapacityStore(table, client, self.launches, clock, sleep)
        self.runners = RunnerStore(table, client, clock, sleep)
        self.terminations = TerminationStore(table, client, clock, sleep)

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
