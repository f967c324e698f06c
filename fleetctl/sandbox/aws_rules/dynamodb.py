"""DynamoDB as it refuses where moto does not: transaction conflicts, and the transaction's idempotency token.

Sources (the DynamoDB API reference and developer guide):

* TransactWriteItems, Errors: https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_TransactWriteItems.html
* Transaction conflict handling:
  https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/transaction-apis.html#transaction-conflict-handling
* ClientRequestToken (idempotency): the same TransactWriteItems page, and
  https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/transaction-apis.html#transaction-apis-idempotency
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, Forward, Rule, ShimConfigError, aws_error

__all__ = ["TransactionConflicts", "TransactionTokens"]

_SINGLE_ITEM_WRITES = frozenset({"PutItem", "UpdateItem", "DeleteItem"})
_TRANSACT = "TransactWriteItems"
CONFLICT_REASON_MESSAGE = "Transaction is ongoing for the item"
CONFLICT_MESSAGE = "Operation was rejected because there is an ongoing transaction for the item."
TOKEN_WINDOW_SECONDS = 600.0


def _is_dynamodb(request: AwsRequest) -> bool:
    return request.protocol == "json" and request.service == "dynamodb"


def _key_values(action: Mapping[str, Any], attribute: str) -> str | None:
    """The string value of ``attribute`` in the key an action (or a single-item write) names."""
    source = action.get("Item") if "Item" in action else action.get("Key")
    if not isinstance(source, Mapping):
        return None
    value = source.get(attribute)
    if isinstance(value, Mapping) and isinstance(value.get("S"), str):
        return str(value["S"])
    return None


def _actions(params: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Each TransactItems entry's one action (Put, Update, Delete or ConditionCheck), in order."""
    found: list[Mapping[str, Any]] = []
    for entry in params.get("TransactItems") or ():
        action: Any = next(iter(entry.values()), {}) if isinstance(entry, Mapping) and entry else {}
        found.append(action if isinstance(action, Mapping) else {})
    return found


def cancelled_for_conflict(request: AwsRequest, conflicting: Sequence[bool]) -> AwsResponse:
    """TransactionCanceledException with one reason per action: ``TransactionConflict`` where an item was in
    another transaction, ``None`` elsewhere (the shape the developer guide shows)."""
    reasons = [
        {"Code": "TransactionConflict", "Message": CONFLICT_REASON_MESSAGE} if hit else {"Code": "None"}
        for hit in conflicting
    ]
    codes = ", ".join(reason["Code"] for reason in reasons)
    message = f"Transaction cancelled, please refer cancellation reasons for specific reasons [{codes}]"
    return aws_error(request, "TransactionCanceledException", message, CancellationReasons=reasons)


@dataclass
class _Injection:
    prefix: str
    attribute: str
    remaining: int
    operations: frozenset[str]
    fired: int = 0


class TransactionConflicts(Rule):
    """Concurrent writes to one item conflict, as DynamoDB's optimistic transactions make them.

    moto applies requests one at a time, so no transaction is ever cancelled for a conflict. AWS cancels a
    ``TransactWriteItems`` with ``TransactionCanceledException`` (reason ``TransactionConflict`` for each item
    another transaction holds, ``None`` for the others) and refuses a ``PutItem`` / ``UpdateItem`` /
    ``DeleteItem`` on such an item with ``TransactionConflictException``. botocore's standard retry mode retries
    neither, so the caller must.

    Two sources of conflicts:

    * live: a write that arrives while a transaction touching one of its items is still being applied (queued
      behind moto's DynamoDB lock, as in AWS it would be in flight) conflicts. On by default; ``live`` turns it
      off or on.
    * injected, deterministically: ``inject`` with ``prefix`` (of the key attribute ``attribute``, default
      ``pk``), ``times`` and ``operations`` (default the transaction only) cancels the next ``times`` writes that
      touch such an item. ``status`` says how many fired.
    """

    name = "transaction-conflicts"

    def __init__(self, *, live: bool = True, key_attribute: str = "pk") -> None:
        self._lock = threading.Lock()
        self._live_default = live
        self._live = live
        self._key_attribute = key_attribute
        self._injections: list[_Injection] = []
        self._in_flight: dict[tuple[str, str], int] = {}
        self.live_conflicts = 0

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        if not _is_dynamodb(request):
            return forward(request)
        if request.operation == _TRANSACT:
            return self._transaction(request, forward)
        if request.operation in _SINGLE_ITEM_WRITES:
            return self._single(request, forward)
        return forward(request)

    def _transaction(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        actions = _actions(request.params)
        keys = [self._item(request, action) for action in actions]
        with self._lock:
            injected = self._fire(request.operation, actions)
            if injected is not None:
                return cancelled_for_conflict(request, injected)
            busy = [key is not None and self._live and self._in_flight.get(key, 0) > 0 for key in keys]
            if any(busy):
                self.live_conflicts += 1
                return cancelled_for_conflict(request, busy)
            held = [key for key in keys if key is not None]
            for key in held:
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            return forward(request)
        finally:
            with self._lock:
                for key in held:
                    left = self._in_flight.get(key, 0) - 1
                    if left > 0:
                        self._in_flight[key] = left
                    else:
                        self._in_flight.pop(key, None)

    def _single(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        key = self._item(request, request.params)
        with self._lock:
            injected = self._fire(request.operation, [request.params])
            busy = key is not None and self._live and self._in_flight.get(key, 0) > 0
            if busy:
                self.live_conflicts += 1
        if injected is not None or busy:
            return aws_error(request, "TransactionConflictException", CONFLICT_MESSAGE)
        return forward(request)

    def _item(self, request: AwsRequest, action: Mapping[str, Any]) -> tuple[str, str] | None:
        value = _key_values(action, self._key_attribute)
        table = action.get("TableName")
        if value is None or not isinstance(table, str):
            return None
        return (f"{request.region}/{table}", value)

    def _fire(self, operation: str, actions: Sequence[Mapping[str, Any]]) -> list[bool] | None:
        """Which actions an injected conflict cancels (None: no injection fires). Called with the lock held."""
        for injection in self._injections:
            if injection.remaining <= 0 or operation not in injection.operations:
                continue
            hits = [
                (value := _key_values(action, injection.attribute)) is not None and value.startswith(injection.prefix)
                for action in actions
            ]
            if any(hits):
                injection.remaining -= 1
                injection.fired += 1
                return hits
        return None

    def configure(self, action: str, payload: dict[str, Any]) -> Any:
        if action == "inject":
            operations = frozenset(payload.get("operations") or [_TRANSACT])
            unknown = operations - _SINGLE_ITEM_WRITES - {_TRANSACT}
            if unknown:
                raise ShimConfigError(f"conflicts apply to {_TRANSACT} and single-item writes, not {sorted(unknown)}")
            times = int(payload.get("times", 1))
            if times < 1:
                raise ShimConfigError(f"times must be at least 1, got {times}")
            injection = _Injection(
                prefix=str(payload["prefix"]),
                attribute=str(payload.get("attribute", self._key_attribute)),
                remaining=times,
                operations=operations,
            )
            self._injections.append(injection)
            return {"injected": len(self._injections) - 1}
        if action == "status":
            return {
                "injections": [
                    {"prefix": i.prefix, "fired": i.fired, "remaining": i.remaining} for i in self._injections
                ],
                "fired": sum(i.fired for i in self._injections),
                "live_conflicts": self.live_conflicts,
                "live": self._live,
            }
        if action == "live":
            self._live = bool(payload["enabled"])
            return {"live": self._live}
        if action == "clear":
            self._injections.clear()
            return {"cleared": True}
        return super().configure(action, payload)

    def reset(self) -> None:
        self._injections.clear()
        self._live = self._live_default
        self.live_conflicts = 0


@dataclass
class _Remembered:
    canonical: str
    completed_at: float
    response: AwsResponse


@dataclass
class _Tokens:
    lock: threading.Lock = field(default_factory=threading.Lock)
    remembered: dict[tuple[str, str], _Remembered] = field(default_factory=dict)
    in_flight: set[tuple[str, str]] = field(default_factory=set)


def canonical_json(params: Mapping[str, Any], ignore: Iterable[str]) -> str:
    """The parameters as one comparable string, without the ones named in ``ignore``."""
    skipped = set(ignore)
    return json.dumps({k: v for k, v in params.items() if k not in skipped}, sort_keys=True, separators=(",", ":"))


class TransactionTokens(Rule):
    """``TransactWriteItems`` honours its ``ClientRequestToken``, which moto ignores.

    Within 10 minutes of the first call with a token completing, the same token with the same parameters
    succeeds again without applying anything; with other parameters it fails with
    ``IdempotentParameterMismatchException``; while the first call is still being applied, a second one gets
    ``TransactionInProgressException``. Only a call that succeeded is remembered. botocore fills the token in
    itself (its ``idempotencyToken`` trait) once per call, so each call has one and its own retries share it;
    the comparison covers every parameter but the token. ``advance`` moves this rule's clock (``seconds``), so a
    test can step past the window.
    """

    name = "transaction-tokens"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._offset = 0.0
        self._tokens = _Tokens()
        self.replayed = 0

    def _now(self) -> float:
        return self._clock() + self._offset

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        token = request.params.get("ClientRequestToken")
        if not (_is_dynamodb(request) and request.operation == _TRANSACT and isinstance(token, str) and token):
            return forward(request)
        key = (request.region, token)
        canonical = canonical_json(request.params, ["ClientRequestToken"])
        tokens = self._tokens
        with tokens.lock:
            found = tokens.remembered.get(key)
            if found is not None and self._now() - found.completed_at > TOKEN_WINDOW_SECONDS:
                del tokens.remembered[key]
                found = None
            if found is not None:
                if found.canonical != canonical:
                    return aws_error(
                        request,
                        "IdempotentParameterMismatchException",
                        "DynamoDB rejected the request because you retried a request with a different payload but "
                        "with an idempotent token that was already used.",
                    )
                self.replayed += 1
                return AwsResponse(found.response.status, list(found.response.headers), found.response.body)
            if key in tokens.in_flight:
                return aws_error(
                    request,
                    "TransactionInProgressException",
                    "The transaction with the given request token is already in progress.",
                )
            tokens.in_flight.add(key)
        try:
            response = forward(request)
        finally:
            with tokens.lock:
                tokens.in_flight.discard(key)
        if response.status == 200:
            with tokens.lock:
                tokens.remembered[key] = _Remembered(canonical, self._now(), response)
        return response

    def configure(self, action: str, payload: dict[str, Any]) -> Any:
        if action == "advance":
            self._offset += float(payload["seconds"])
            return {"offset": self._offset}
        if action == "status":
            return {"remembered": len(self._tokens.remembered), "replayed": self.replayed}
        return super().configure(action, payload)

    def reset(self) -> None:
        self._tokens = _Tokens()
        self._offset = 0.0
        self.replayed = 0
