"""Writes to the fleet table that ride out DynamoDB's transaction conflicts: what every scale store shares.

Scale-up, the lifecycle handlers and reconcile meet on the same items (a pool's counter above all), so their
transactions and single-item writes cancel each other now and then. Each store is a :class:`ScaleTable`, whose
writes try again past such a conflict and report a refused condition as a value, for the caller to read what is
there and decide.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.store import FleetStore, attribute_value, conflict_backoff, from_item

CONFLICT_ATTEMPTS = 4
# DynamoDB cancels a transaction that meets another one on an item (``TransactionConflict``), or that is throttled
# (``ThrottlingError``, ``ProvisionedThroughputExceeded``), and refuses a single-item write on an item a
# transaction holds (``TransactionConflictException``). botocore's standard retry mode retries none of these, so
# the store does, with jittered exponential backoff, a bounded number of times; the last failure is raised.
TRANSIENT_CANCELLATION_REASONS = frozenset({"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"})
_WRITE_ATTEMPTS = 8
# A lease going back to its pool (a termination, a launch giving back what it did not use) meets the pool's counter
# at its hottest, when jobs waiting for capacity take what frees up: it keeps trying for longer (about 12 s, well
# inside the instance-state function's 30 s), since failing sends the event to Lambda's retry a minute later and
# the lease stays out of the pool meanwhile.
GIVE_BACK_ATTEMPTS = 16


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


def update_request(
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


class ScaleTable(FleetStore):
    """The fleet table, with single-item writes and transactions that are tried again past conflicts."""

    conflict_attempts = _WRITE_ATTEMPTS

    def _transact(self, writes: list[dict[str, Any]], attempts: int = _WRITE_ATTEMPTS) -> ClientError | None:
        """One TransactWriteItems, tried again while DynamoDB cancels it only for a conflict or throttling.

        Returns None once it applied, or the TransactionCanceledException when it was cancelled for a reason
        another attempt does not change (a failed condition: the caller reads what is there and decides). Raises
        that exception when conflicts outlast the attempts, so the caller's event fails visibly and comes back,
        rather than be taken as done. Each attempt is a new call, with a new idempotency token: the cancelled
        one changed nothing.
        """
        for attempt in range(attempts):
            try:
                self._client.transact_write_items(TransactItems=writes)
            except ClientError as exc:
                if error_code(exc) != "TransactionCanceledException":
                    raise
                if not transiently_cancelled(exc):
                    return exc
                if attempt + 1 == attempts:
                    raise
                self._sleep(conflict_backoff(attempt))
                continue
            return None
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
