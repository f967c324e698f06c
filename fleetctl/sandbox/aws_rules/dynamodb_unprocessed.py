"""DynamoDB's BatchGetItem may leave some of the requested keys unread and name them under ``UnprocessedKeys``;
moto reads every key (short of its 16 MB answer limit).

Source: the BatchGetItem API reference,
https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_BatchGetItem.html: a partial result comes
"if the response size limit is exceeded, the table's provisioned throughput is exceeded, more than 1MB per
partition is requested, or an internal processing failure occurs"; "If DynamoDB returns any unprocessed items,
you should retry the batch operation on those items". ``UnprocessedKeys`` (the response element) is "in the
same form as RequestItems, so the value can be provided directly to a subsequent BatchGetItem operation": per
table its ``Keys`` with the request's ``ProjectionExpression``, ``ExpressionAttributeNames``, ``ConsistentRead``
and ``AttributesToGet``. A successful answer may read no item at all: a requested key with no item is processed
without a ``Responses`` entry, and one answer can leave every key unprocessed with ``Responses`` empty (a real
answer of that shape: pynamodb/PynamoDB pull request 253). Only when throughput leaves nothing readable on every
table does the call fail instead, with ``ProvisionedThroughputExceededException``, which this rule does not
model.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleetctl.sandbox.aws_rules.support import key_identity, with_json_body
from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, Forward, Rule, ShimConfigError

__all__ = ["BatchGetUnprocessedKeys", "defer_keys", "deferrable_keys"]

# What a table's UnprocessedKeys entry carries besides its keys, when the request had it.
KEPT_PARAMETERS = ("ProjectionExpression", "ExpressionAttributeNames", "ConsistentRead", "AttributesToGet")


@dataclass(frozen=True)
class RequestedKey:
    table: str
    index: int  # its place in the table's requested Keys
    key: Mapping[str, Any]


def deferrable_keys(request_items: Mapping[str, Any], answer: Mapping[str, Any]) -> list[RequestedKey]:
    """The requested keys this answer processed, and that can be told apart in it: a table whose answered items
    lack a key attribute (its projection left the key out) is left alone, as no item there can be matched to
    its key. Keys moto itself left unprocessed are not counted twice."""
    found: list[RequestedKey] = []
    responses = answer.get("Responses") or {}
    unprocessed = answer.get("UnprocessedKeys") or {}
    for table, entry in request_items.items():
        keys = entry.get("Keys") if isinstance(entry, Mapping) else None
        if not isinstance(keys, list) or not keys:
            continue
        names = sorted(keys[0]) if isinstance(keys[0], Mapping) else []
        items = responses.get(table) or []
        if not names or any(key_identity(item, names) is None for item in items):
            continue
        already = {key_identity(key, names) for key in (unprocessed.get(table) or {}).get("Keys") or []}
        found += [
            RequestedKey(table, index, key)
            for index, key in enumerate(keys)
            if isinstance(key, Mapping) and key_identity(key, names) not in already
        ]
    return found


def defer_keys(
    request_items: Mapping[str, Any], answer: Mapping[str, Any], deferred: Sequence[RequestedKey]
) -> dict[str, Any]:
    """``answer`` with the ``deferred`` keys moved from ``Responses`` (where their items were) to
    ``UnprocessedKeys``, each table's entry in the request's form."""
    moved = dict(answer)
    responses = {table: list(items) for table, items in (answer.get("Responses") or {}).items()}
    unprocessed = {table: dict(entry) for table, entry in (answer.get("UnprocessedKeys") or {}).items()}
    by_table: dict[str, list[RequestedKey]] = {}
    for requested in deferred:
        by_table.setdefault(requested.table, []).append(requested)
    for table, keys in by_table.items():
        names = sorted(keys[0].key)
        gone = {key_identity(requested.key, names) for requested in keys}
        responses[table] = [item for item in responses.get(table, []) if key_identity(item, names) not in gone]
        entry = unprocessed.setdefault(table, {"Keys": []})
        entry["Keys"] = [*entry.get("Keys", []), *(r.key for r in sorted(keys, key=lambda r: r.index))]
        request = request_items[table]
        entry.update({name: request[name] for name in KEPT_PARAMETERS if name in request})
    moved["Responses"] = responses
    moved["UnprocessedKeys"] = unprocessed
    return moved


class BatchGetUnprocessedKeys(Rule):
    """A share of BatchGetItem calls leave a random non-empty subset of the keys they read (possibly all of
    them) unprocessed: their items leave ``Responses`` and their keys go to ``UnprocessedKeys``.

    Any requested key may be left unprocessed, whether or not it has an item: DynamoDB only knows once it reads
    it. A table whose answered items lack a key attribute (a projection without the key) is left alone. The
    draws come from a generator seeded by configuration, so a run with the same calls in the same order leaves
    the same keys unprocessed.

    ``POST /_shim/dynamodb-unprocessed-keys/<action>``:

    * ``set`` ``{"share": 0.3, "seed": 7}``: the share of calls (0 to 1; 0, the default, turns it off) and,
      optionally, a new seed;
    * ``inject`` ``{"times": 2}``: the next ``times`` calls leave keys unprocessed, whatever the share;
    * ``status`` ``{}``: the share, the injected calls still to come, how many calls left keys unprocessed and
      how many keys in all.
    """

    name = "dynamodb-unprocessed-keys"

    def __init__(self, *, share: float = 0.0, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._default_share = _share(share)
        self._default_seed = int(seed)
        self._share = self._default_share
        self._random = random.Random(self._default_seed)
        self._injected = 0
        self.fired = 0
        self.deferred = 0

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        if request.protocol != "json" or request.service != "dynamodb" or request.operation != "BatchGetItem":
            return forward(request)
        response = forward(request)
        if response.status != 200 or (self._share <= 0 and self._injected <= 0):
            return response
        request_items = request.params.get("RequestItems")
        if not isinstance(request_items, Mapping):
            return response
        answer = response.json()
        candidates = deferrable_keys(request_items, answer)
        if not candidates:
            return response
        with self._lock:
            if not self._fires():
                return response
            deferred = self._random.sample(candidates, self._random.randint(1, len(candidates)))
            self.fired += 1
            self.deferred += len(deferred)
        return with_json_body(response, defer_keys(request_items, answer, deferred))

    def _fires(self) -> bool:
        """Whether this call leaves keys unprocessed. Lock held."""
        if self._injected > 0:
            self._injected -= 1
            return True
        return self._share > 0 and self._random.random() < self._share

    def configure(self, action: str, payload: dict[str, Any]) -> Any:
        if action == "set":
            share = _share(payload["share"])
            with self._lock:
                self._share = share
                if "seed" in payload:
                    self._random = random.Random(int(payload["seed"]))
            return {"share": share}
        if action == "inject":
            times = int(payload.get("times", 1))
            if times < 1:
                raise ShimConfigError(f"times must be at least 1, got {times}")
            with self._lock:
                self._injected += times
                return {"injected": self._injected}
        if action == "status":
            with self._lock:
                return {
                    "share": self._share,
                    "injected": self._injected,
                    "fired": self.fired,
                    "deferred": self.deferred,
                }
        return super().configure(action, payload)

    def reset(self) -> None:
        with self._lock:
            self._share = self._default_share
            self._random = random.Random(self._default_seed)
            self._injected = 0
            self.fired = 0
            self.deferred = 0


def _share(value: Any) -> float:
    share = float(value)
    if not 0.0 <= share <= 1.0:
        raise ShimConfigError(f"share must be between 0 and 1, got {value!r}")
    return share
