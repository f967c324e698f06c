"""EC2 honours CreateFleet's ``ClientToken``, which moto ignores (every call makes a new fleet).

Source: "Ensuring idempotency in Amazon EC2 API requests",
https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-idempotency.html (CreateFleet is among the actions that
take a client token), and the EC2 error codes, https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html
(``IdempotentParameterMismatch``, a client error: HTTP 400).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, Forward, Rule, aws_error

__all__ = ["ClientTokens"]

MISMATCH_MESSAGE = "Arguments on this idempotent request are inconsistent with arguments used in previous request(s)."
_TOKEN_PARAMETER = "ClientToken"  # noqa: S105 - a parameter name, not a secret


@dataclass(frozen=True)
class _Remembered:
    canonical: tuple[tuple[str, str], ...]
    response: AwsResponse


class ClientTokens(Rule):
    """A repeated ``CreateFleet`` with the same ``ClientToken``: the same parameters get the first call's answer
    (the same fleet id and instances; nothing new is launched), other parameters get
    ``IdempotentParameterMismatch``.

    Only a call EC2 completed (HTTP 200, which for an instant fleet includes a fleet with errors and no
    instance) is remembered; a refused or throttled call may be sent again with the same token. Parameters are
    compared as the query pairs the caller sent (list members keep their numbered order), without the token. A
    token is per region, and remembered until ``POST /moto-api/reset`` (AWS keeps it at least 24 hours). Calls
    with one token are handled one at a time, so a second call that arrives while the first is still running
    waits for the first answer, as a retry would.
    """

    name = "ec2-client-tokens"
    operations = frozenset({"CreateFleet"})

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._remembered: dict[tuple[str, str, str], _Remembered] = {}
        self._token_locks: defaultdict[tuple[str, str, str], threading.Lock] = defaultdict(threading.Lock)
        self.replayed = 0

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        token = request.params.get(_TOKEN_PARAMETER, "")
        if request.service != "ec2" or request.operation not in self.operations or not token:
            return forward(request)
        key = (request.region, request.operation, token)
        canonical = tuple(sorted((k, v) for k, v in request.pairs if k != _TOKEN_PARAMETER))
        with self._lock:
            token_lock = self._token_locks[key]
        with token_lock:
            with self._lock:
                found = self._remembered.get(key)
            if found is not None:
                if found.canonical != canonical:
                    return aws_error(request, "IdempotentParameterMismatch", MISMATCH_MESSAGE)
                with self._lock:
                    self.replayed += 1
                return AwsResponse(found.response.status, list(found.response.headers), found.response.body)
            response = forward(request)
            if response.status == 200:
                with self._lock:
                    self._remembered[key] = _Remembered(canonical, response)
            return response

    def configure(self, action: str, payload: dict[str, Any]) -> Any:
        if action == "status":
            with self._lock:
                return {"remembered": len(self._remembered), "replayed": self.replayed}
        return super().configure(action, payload)

    def reset(self) -> None:
        with self._lock:
            self._remembered.clear()
            self._token_locks.clear()
            self.replayed = 0
