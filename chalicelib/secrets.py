"""The webhook secrets, read from SSM Parameter Store and cached per Lambda container.

Both parameters are fetched in one ``GetParameters`` call through Powertools Parameters. A missing or empty
token is cached too, so a misconfigured fleet refuses every webhook (fail closed) without turning each refused
request into an SSM call; a transient SSM failure is not cached and becomes a 503 that GitLab retries.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chalicelib.errors import SecretUnavailableError

DEFAULT_MAX_AGE_SECONDS = 60


@dataclass(frozen=True)
class WebhookSecrets:
    token: str | None
    signing_secret: str | None


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
        from aws_lambda_powertools.utilities.parameters import SSMProvider
        from aws_lambda_powertools.utilities.parameters.exceptions import GetParameterError
        from botocore.exceptions import BotoCoreError, ClientError

        names = [self._token_parameter] + ([self._signing_parameter] if self._signing_parameter else [])
        provider = SSMProvider(boto3_client=self._ssm_client)
        try:
            # max_age=0: this class owns the cache (it also remembers "missing", which Powertools does not).
            found = provider.get_parameters_by_name(
                {name: {} for name in names}, decrypt=True, max_age=0, raise_on_error=False
            )
        except (GetParameterError, ClientError, BotoCoreError) as exc:
            raise SecretUnavailableError(f"cannot read webhook secrets: {exc}") from None
        token = found.get(self._token_parameter)
        signing = found.get(self._signing_parameter) if self._signing_parameter else None
        return WebhookSecrets(
            token=token.strip() if isinstance(token, str) and token.strip() else None,
            signing_secret=signing.strip() if isinstance(signing, str) and signing.strip() else None,
        )
