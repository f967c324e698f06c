"""DynamoDB throttles: a burst of requests past what a partition serves is refused, which moto never does.

Sources:

* The DynamoDB API reference, "Common Errors" and each data-plane action's Errors,
  https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/CommonErrors.html: a throttled request is answered
  HTTP 400 ``ProvisionedThroughputExceededException`` ("The request was denied due to request throttling ... The
  AWS SDKs for DynamoDB automatically retry requests that receive this exception"), with ``ThrottlingReasons``
  naming why and the resource.
* "Understanding DynamoDB throttling", https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/TroubleshootingThrottling.html:
  an on-demand table throttles too, when one partition's key range takes more than it serves
  (``TableReadKeyRangeThroughputExceeded``, ``TableWriteKeyRangeThroughputExceeded``).
* botocore's standard retry mode counts it a throttling error and retries it with backoff (``retryhandler``'s
  throttling codes), so a short burst is absorbed and a long one reaches the caller.
"""

from __future__ import annotations

import threading
from typing import Any

from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, Forward, Rule, ShimConfigError, aws_error

__all__ = ["DynamoDbThrottling"]

THROTTLED = "ProvisionedThroughputExceededException"
THROTTLED_MESSAGE = "The request was denied due to request throttling."
_READS = frozenset({"GetItem", "BatchGetItem", "Query", "Scan", "TransactGetItems"})
_WRITES = frozenset({"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"})


class DynamoDbThrottling(Rule):
    """Answers the next ``calls`` DynamoDB data-plane requests (reads and writes; of ``operations`` when given)
    with ``ProvisionedThroughputExceededException``, as a partition past its throughput does. Control-plane calls
    (CreateTable, DescribeTable...) pass.

    ``POST /_shim/dynamodb-throttling/<action>``:

    * ``burst`` ``{"calls": 20, "operations": ["UpdateItem"]}``: throttle the next 20 matching requests (bursts
      add up);
    * ``clear`` ``{}``: forget what is left of every burst;
    * ``status`` ``{}``: requests throttled so far, and how many are still to be.
    """

    name = "dynamodb-throttling"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bursts: list[tuple[frozenset[str], int]] = []
        self.throttled = 0

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        if request.service != "dynamodb" or request.protocol != "json":
            return forward(request)
        operation = request.operation
        if operation not in _READS and operation not in _WRITES:
            return forward(request)
        with self._lock:
            hit = next((i for i, (ops, _) in enumerate(self._bursts) if not ops or operation in ops), None)
            if hit is not None:
                ops, left = self._bursts[hit]
                if left <= 1:
                    self._bursts.pop(hit)
                else:
                    self._bursts[hit] = (ops, left - 1)
                self.throttled += 1
        if hit is None:
            return forward(request)
        table = str(request.params.get("TableName") or "")
        kind = "Read" if operation in _READS else "Write"
        reasons = [
            {
                "reason": f"Table{kind}KeyRangeThroughputExceeded",
                "resource": f"arn:aws:dynamodb:{request.region}:123456789012:table/{table}",
            }
        ]
        return aws_error(request, THROTTLED, THROTTLED_MESSAGE, ThrottlingReasons=reasons)

    def configure(self, action: str, payload: dict[str, Any]) -> Any:
        if action == "burst":
            calls = int(payload.get("calls", 1))
            if calls < 1:
                raise ShimConfigError(f"calls must be at least 1, got {calls}")
            operations = frozenset(str(op) for op in payload.get("operations") or ())
            unknown = operations - _READS - _WRITES
            if unknown:
                raise ShimConfigError(f"not DynamoDB data-plane operations: {sorted(unknown)}")
            with self._lock:
                self._bursts.append((operations, calls))
            return {"bursts": len(self._bursts)}
        if action == "clear":
            with self._lock:
                self._bursts.clear()
            return {"bursts": 0}
        if action == "status":
            with self._lock:
                return {"throttled": self.throttled, "left": sum(left for _, left in self._bursts)}
        return super().configure(action, payload)

    def reset(self) -> None:
        with self._lock:
            self._bursts.clear()
            self.throttled = 0
