"""Parameter Store throughput: AWS throttles Parameter Store per account and Region; moto never does.

AWS answers a call past its quota with HTTP 400 ``ThrottlingException`` "Rate exceeded". The quotas, in
transactions per second per account and Region:

* GetParameter, GetParameters and GetParametersByPath share 40 with the default ("standard") throughput
  (AWS General Reference, "AWS Systems Manager endpoints and quotas", Parameter Store, "Max throughput
  (transactions per second)"). With higher throughput enabled, GetParameter and GetParameters share 10,000 and
  GetParametersByPath has 100 of its own.
* PutParameter: 3 with the standard throughput, 10 with higher throughput. The quota page does not list it; AWS
  Support gave these figures (github-aws-runners/terraform-aws-github-runner issue 2944, where a runner
  autoscaler writing one token parameter per instance met them), and the PutParameter API reference says the
  throughput setting applies to PutParameter too.

Other Parameter Store calls (DeleteParameter, DescribeParameters...) are throttled by AWS too, at figures it does
not publish; the shim leaves them alone rather than invent one.

AWS does not document its burst for these quotas. Each group here is a token bucket that refills at the quota's
rate and holds one second of it (40 calls for the reads, 3 for PutParameter): a client may spend a second's worth
at once, then only the rate.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, Forward, Rule, ShimConfigError, aws_error

THROTTLED_CODE = "ThrottlingException"
THROTTLED_MESSAGE = "Rate exceeded"

# operation -> the quota group it spends from, and each group's rate (calls per second), by throughput setting.
_STANDARD_GROUPS = {
    "GetParameter": "reads",
    "GetParameters": "reads",
    "GetParametersByPath": "reads",
    "PutParameter": "PutParameter",
}
_HIGH_GROUPS = {**_STANDARD_GROUPS, "GetParametersByPath": "GetParametersByPath"}
STANDARD_QUOTAS = {"reads": 40.0, "PutParameter": 3.0}
HIGH_QUOTAS = {"reads": 10_000.0, "GetParametersByPath": 100.0, "PutParameter": 10.0}


@dataclass
class TokenBucket:
    """``rate`` tokens a second, up to ``burst`` held; a call takes one or is refused."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class ParameterStoreThroughput(Rule):
    """Throttles Parameter Store calls past their quota, per Region, with AWS's ``ThrottlingException``.

    ``POST /_shim/ssm-throughput/<action>``:

    * ``high_throughput`` ``{"enabled": true}``: the quotas of the higher throughput setting;
    * ``quota`` ``{"group": "PutParameter", "rate": 1, "burst": 1}``: another rate (and burst) for one group;
    * ``enabled`` ``{"enabled": false}``: no throttling at all;
    * ``throttled`` ``{}``: how many calls of each operation were refused since the last reset.
    """

    name = "ssm-throughput"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._enabled = True
            self._high = False
            self._overrides: dict[str, tuple[float, float]] = {}
            self._buckets: dict[tuple[str, str], TokenBucket] = {}
            self._throttled: Counter[str] = Counter()

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        if request.service != "ssm":
            return forward(request)
        groups = _HIGH_GROUPS if self._high else _STANDARD_GROUPS
        group = groups.get(request.operation)
        if group is None or not self._enabled:
            return forward(request)
        with self._lock:
            allowed = self._bucket(request.region, group).take(self._clock())
            if not allowed:
                self._throttled[request.operation] += 1
        if not allowed:
            return aws_error(request, THROTTLED_CODE, THROTTLED_MESSAGE, 400)
        return forward(request)

    def _bucket(self, region: str, group: str) -> TokenBucket:
        found = self._buckets.get((region, group))
        if found is None:
            rate, burst = self._limits(group)
            found = self._buckets[(region, group)] = TokenBucket(rate, burst, burst, self._clock())
        return found

    def _limits(self, group: str) -> tuple[float, float]:
        if group in self._overrides:
            return self._overrides[group]
        rate = (HIGH_QUOTAS if self._high else STANDARD_QUOTAS)[group]
        return rate, rate

    def configure(self, action: str, payload: dict[str, Any]) -> Any:
        with self._lock:
            return self._configure(action, payload)

    def _configure(self, action: str, payload: dict[str, Any]) -> Any:
        if action == "throttled":
            return dict(self._throttled)
        if action == "enabled":
            self._enabled = bool(payload["enabled"])
            return self._enabled
        if action == "high_throughput":
            self._high = bool(payload["enabled"])
            self._buckets.clear()
            return self._high
        if action == "quota":
            group = str(payload["group"])
            if group not in {*STANDARD_QUOTAS, *HIGH_QUOTAS}:
                raise ShimConfigError(f"no quota group {group!r}; known: {sorted({*STANDARD_QUOTAS, *HIGH_QUOTAS})}")
            rate = float(payload["rate"])
            burst = float(payload.get("burst", rate))
            if rate <= 0 or burst < 1:
                raise ShimConfigError("rate must be positive and burst at least 1")
            self._overrides[group] = (rate, burst)
            self._buckets = {key: bucket for key, bucket in self._buckets.items() if key[1] != group}
            return {"group": group, "rate": rate, "burst": burst}
        return super().configure(action, payload)
