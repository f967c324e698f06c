"""The webhook secrets, read from SSM Parameter Store and cached per Lambda container.

Both parameters are fetched in one ``GetParameters`` call, made directly on the injected client: Powertools'
``get_parameters_by_name(raise_on_error=False)`` reports a parameter it failed to read (throttled, KMS error)
the same way as one that does not exist, which would turn a transient failure into a cached "not configured"
and a 401 that may get the hook disabled. Here only a name SSM lists in ``InvalidParameters`` is missing.

A missing or empty token is cached too, so a misconfigured fleet refuses every webhook (fail closed) without
turning each refused request into an SSM call; a failure to read is never cached: it is a
``SecretUnavailableError`` (503), and the next request reads SSM again.

The signing parameter is written by ``fleetctl gitlab connect`` from GitLab's answer: the secret once GitLab has
confirmed that it signs the hook's deliveries (``signing_token_present: true``), or the word ``unsigned``
(:data:`UNSIGNED`) when GitLab ignored the secret (before 19.0, or with its ``webhook_signing_token`` flag off):
only then is the token alone checked. A configured signing parameter that is missing (connect never ran, or a
name mistyped) or blank refuses every request (``signing_required`` without a ``signing_secret``), and one that
cannot be read is a 503: none of them is ever a silent downgrade to the token alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.errors import SecretUnavailableError

DEFAULT_MAX_AGE_SECONDS = 60
# The signing parameter's value when GitLab does not sign this fleet's hook: check X-Gitlab-Token alone.
UNSIGNED = "unsigned"


@dataclass(frozen=True)
class WebhookSecrets:
    """The secrets as read; ``None`` is missing or empty. Their values never appear in a ``repr``."""

    token: str | None = field(repr=False)
    signing_secret: str | None = field(default=None, repr=False)
    signing_required: bool = False


class WebhookSecretSource:
    def __init__(
        self,
        ssm_client: Any,
        token_parameter: str,
        signing_parameter: str | None = None,
        *,
        max_age: float = DEFAULT_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ssm_client = ssm_client
        self._token_parameter = token_parameter
        self._signing_parameter = signing_parameter
        self._max_age = max_age
        self._clock = clock
        self._cached: tuple[float, WebhookSecrets] | None = None
        self._lock = threading.Lock()

    def get(self) -> WebhookSecrets:
        cached = self._cached
        if cached is not None and self._clock() - cached[0] < self._max_age:
            return cached[1]
        with self._lock:
            cached = self._cached
            if cached is not None and self._clock() - cached[0] < self._max_age:
                return cached[1]
            secrets = self._fetch()
            self._cached = (self._clock(), secrets)
            return secrets

    def _fetch(self) -> WebhookSecrets:
        names = [self._token_parameter] + ([self._signing_parameter] if self._signing_parameter else [])
        try:
            found = self._ssm_client.get_parameters(Names=names, WithDecryption=True)
        except (ClientError, BotoCoreError) as exc:
            raise SecretUnavailableError(f"cannot read webhook secrets: {exc}") from None
        values = {p.get("Name"): p.get("Value") for p in found.get("Parameters", [])}
        missing = set(found.get("InvalidParameters", []))
        unaccounted = [name for name in names if name not in values and name not in missing]
        if unaccounted:
            raise SecretUnavailableError(f"SSM answered neither a value nor 'missing' for {unaccounted}")
        signing = _secret(values.get(self._signing_parameter)) if self._signing_parameter else None
        unsigned = self._signing_parameter is None or signing == UNSIGNED
        return WebhookSecrets(
            token=_secret(values.get(self._token_parameter)),
            signing_secret=None if unsigned else signing,
            signing_required=not unsigned,
        )


def _secret(value: object) -> str | None:
    return value.strip() or None if isinstance(value, str) else None
