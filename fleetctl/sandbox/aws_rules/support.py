"""What several shim rules share: the account moto serves a request from (rules read moto's own state in this
process, as AWS reads its own), a DynamoDB key as one comparable value, and an answer with a body the rule
rewrote.

A DynamoDB answer carries ``x-amz-crc32``, the CRC32 of its body, which botocore checks (and retries on a
mismatch, then fails): a rule that rewrites the body must give it the new body's checksum, as DynamoDB would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, Rule, ShimConfigError

__all__ = [
    "LaggingRule",
    "dynamodb_backend",
    "key_identity",
    "lag_seconds",
    "moto_account",
    "with_body",
    "with_json_body",
]

_ACCESS_KEY = re.compile(r"Credential=([^/]+)/")
_CRC32_HEADER = "x-amz-crc32"


def lag_seconds(value: Any) -> float:
    """A read lag from a ``/_shim`` payload: a finite number of seconds, not negative."""
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ShimConfigError(f"seconds must be a finite number, not negative; got {value!r}")
    return seconds


def moto_account(request: AwsRequest) -> str:
    """The account moto serves this request from, found as moto finds it."""
    from moto.iam.models import get_account_id_from

    if "MOTO_ACCOUNT_ID" in os.environ:
        return os.environ["MOTO_ACCOUNT_ID"]
    header = request.environ.get("HTTP_X_MOTO_ACCOUNT_ID")
    if header:
        return str(header)
    found = _ACCESS_KEY.search(str(request.environ.get("HTTP_AUTHORIZATION", "")))
    return get_account_id_from(found[1] if found else "")


def dynamodb_backend(request: AwsRequest) -> Any:
    from moto.dynamodb.models import dynamodb_backends

    return dynamodb_backends[moto_account(request)][request.region]


def key_identity(item: Mapping[str, Any], names: Sequence[str]) -> tuple[tuple[str, str], ...] | None:
    """The values of the key attributes ``names`` of an item (or key) in DynamoDB JSON, as one hashable value, or
    None when one is missing or of no key type (S, N or B). A number counts by its value, as DynamoDB compares
    keys: ``1`` and ``1.0`` name one item."""
    found: list[tuple[str, str]] = []
    for name in names:
        value = item.get(name)
        if not isinstance(value, Mapping) or len(value) != 1:
            return None
        kind, raw = next(iter(value.items()))
        if kind not in ("S", "N", "B") or not isinstance(raw, str):
            return None
        if kind == "N":
            with contextlib.suppress(ArithmeticError):
                raw = str(Decimal(raw).normalize())
        found.append((kind, raw))
    return tuple(found)


def with_body(response: AwsResponse, body: bytes) -> AwsResponse:
    """``response`` with another body: its length, and its CRC32 where the answer carried one."""
    kept = [(key, value) for key, value in response.headers if key.lower() not in ("content-length", _CRC32_HEADER)]
    if response.header(_CRC32_HEADER) is not None:
        kept.append((_CRC32_HEADER, str(zlib.crc32(body) & 0xFFFFFFFF)))
    return AwsResponse(response.status, [*kept, ("Content-Length", str(len(body)))], body)


def with_json_body(response: AwsResponse, answer: Any) -> AwsResponse:
    return with_body(response, json.dumps(answer).encode())


class LaggingRule(Rule):
    """A rule that makes a read lag the writes or launches it remembers: the lag, a clock a test can move on, and
    the ``set`` and ``advance`` actions. A subclass keeps what it remembers under ``_lock``, forgets it in
    ``_forget`` (the lag set to 0, or a reset) and answers ``status`` with ``_status``."""

    def __init__(self, *, seconds: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._default = lag_seconds(seconds)
        self._seconds = self._default
        self._offset = 0.0
        self._lock = threading.Lock()

    def _now(self) -> float:
        return self._clock() + self._offset

    def _forget(self) -> None:
        """Drop what the rule remembers (the lag set to 0, or a reset). Called with ``_lock`` held."""

    def _status(self) -> dict[str, Any]:
        """The ``status`` answer beyond the lag. Called with ``_lock`` held."""
        return {}

    def configure(self, action: str, payload: dict[str, Any]) -> Any:
        if action == "set":
            seconds = lag_seconds(payload["seconds"])
            with self._lock:
                self._seconds = seconds
                if seconds == 0:
                    self._forget()
            return {"seconds": seconds}
        if action == "advance":
            step = lag_seconds(payload["seconds"])
            with self._lock:
                self._offset += step
                return {"offset": self._offset}
        if action == "status":
            with self._lock:
                return {"seconds": self._seconds, **self._status()}
        return super().configure(action, payload)

    def reset(self) -> None:
        with self._lock:
            self._seconds = self._default
            self._offset = 0.0
            self._forget()
