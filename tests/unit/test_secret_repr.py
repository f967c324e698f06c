"""Values that hold secrets keep them out of ``repr``: a log line or a traceback's locals never show a token."""

from __future__ import annotations

from chalicelib.gitlab_api import RunnerCredentials
from chalicelib.intake.secrets import WebhookSecrets


def test_runner_credentials_show_the_runner_not_its_token() -> None:
    credentials = RunnerCredentials(runner_id=42, token="glrt-secret-value")
    assert "42" in repr(credentials)
    assert "glrt-secret-value" not in repr(credentials)
    assert "glrt-secret-value" not in str(credentials)


def test_webhook_secrets_repr_shows_neither_secret() -> None:
    secrets = WebhookSecrets(token="hook-token-value", signing_secret="whsec-signing-value")
    assert "hook-token-value" not in repr(secrets)
    assert "whsec-signing-value" not in repr(secrets)
