"""The webhook's secrets, over real HTTP to the served app, with SSM on moto server and faults at the wire.

A configured signing secret that cannot be read refuses every request (never a downgrade to the token alone), and
so does one left blank or never written; one that says ``unsigned`` (GitLab does not sign) leaves the token check
alone;
an SSM failure is a 503 that is not cached, so the next delivery succeeds once SSM is back; only a parameter SSM
reports as missing is "not configured", and that answer is cached.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from chalicelib.config import CONFIG_ENV_VAR
from chalicelib.intake.secrets import UNSIGNED
from chalicelib.intake.settings import WEBHOOK_SIGNING_PARAMETER
from chalicelib.intake.signing import sign
from tests.faults import WireFaults
from tests.payloads import gitlab_headers, job_hook

SIGNING_PARAMETER = "/runner-fleet/dev/webhook-signing-secret"
SOME_SECRET = "whsec_" + "a2V5LWtleS1rZXkta2V5LWtleS1rZXkta2V5LWtleSE="


class Webhook:
    def __init__(self, sandbox: Any) -> None:
        from chalicelib import runtime

        self.runtime = runtime
        self.url = sandbox.server.webhook_url
        self.token = sandbox.secrets()["token"]
        self.token_parameter = sandbox.config.webhook.token_parameter

    @property
    def ssm(self) -> Any:
        """The served app's own SSM client (a new one after each ``runtime.reset()``)."""
        return self.runtime.aws().ssm

    def post(self, *, signed_with: str | None = None, token: str | None = None) -> requests.Response:
        body = json.dumps(job_hook("pending")).encode()
        headers = gitlab_headers(self.token if token is None else token)
        if signed_with is not None:
            webhook_id, timestamp = f"msg_{uuid.uuid4().hex}", int(time.time())
            headers |= {
                "webhook-id": webhook_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(signed_with, webhook_id, timestamp, body),
            }
        return requests.post(self.url, data=body, headers=headers, timeout=30)

    def queued(self) -> list[dict[str, Any]]:
        sqs, url = self.runtime.aws().sqs, self.runtime.jobs_queue().url
        found = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        return [json.loads(m["Body"]) for m in found.get("Messages", [])]


@pytest.fixture
def webhook(fresh_sandbox: Any) -> Webhook:
    return Webhook(fresh_sandbox)


@pytest.fixture
def signing_configured(webhook: Webhook, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Webhook]:
    """The stage names a signing parameter: its stage file, and so the webhook Lambda's environment and policy."""
    stage_file = Path(os.environ[CONFIG_ENV_VAR])
    document = json.loads(stage_file.read_text())
    document["webhook"]["signing_secret_parameter"] = SIGNING_PARAMETER
    signed_stage = tmp_path / stage_file.name
    signed_stage.write_text(json.dumps(document))
    monkeypatch.setenv(CONFIG_ENV_VAR, str(signed_stage))
    monkeypatch.setenv(WEBHOOK_SIGNING_PARAMETER, SIGNING_PARAMETER)
    webhook.runtime.reset()
    yield webhook
    monkeypatch.undo()
    webhook.runtime.reset()


# -- a configured signing secret that cannot be used refuses every request ---------------------------------------


def test_a_configured_signing_parameter_never_written_refuses_even_the_right_token(signing_configured: Webhook) -> None:
    """A stage that names a signing parameter asked for signed deliveries: until ``fleetctl gitlab connect`` has
    written either the secret or ``unsigned``, nothing says GitLab does not sign, so nothing is accepted."""
    # given the parameter is configured but was never created (connect not run yet, or a mistyped name)
    # when GitLab sends the right token unsigned, and signed with some secret
    answers = [signing_configured.post().status_code, signing_configured.post(signed_with=SOME_SECRET).status_code]
    # then both are refused: never a silent downgrade to the token alone
    assert answers == [401, 401]
    assert signing_configured.queued() == []


def test_a_signing_parameter_marked_unsigned_checks_the_token_alone(signing_configured: Webhook) -> None:
    """What connect writes when GitLab ignores ``signing_token`` (before 19.0, or 19.0 with the
    webhook_signing_token flag off, gitlab-org/gitlab!231325): GitLab then sends the token alone."""
    # given connect found that GitLab does not sign
    signing_configured.ssm.put_parameter(Name=SIGNING_PARAMETER, Value=UNSIGNED, Type="SecureString")
    # when GitLab sends the right token unsigned, and someone a wrong token
    right, wrong = signing_configured.post(), signing_configured.post(token="not-the-token")
    # then
    assert (right.status_code, right.json()) == (200, {"queued": True})
    assert wrong.status_code == 401
    assert len(signing_configured.queued()) == 1


def test_a_configured_signing_parameter_left_blank_refuses_even_the_right_token(signing_configured: Webhook) -> None:
    # given the parameter exists but holds only whitespace (SSM refuses an empty value)
    signing_configured.ssm.put_parameter(Name=SIGNING_PARAMETER, Value="  ", Type="SecureString")
    # when
    answers = [signing_configured.post().status_code, signing_configured.post(signed_with=SOME_SECRET).status_code]
    # then
    assert answers == [401, 401]
    assert signing_configured.queued() == []


def test_a_readable_signing_secret_accepts_signed_and_refuses_unsigned(signing_configured: Webhook) -> None:
    signing_configured.ssm.put_parameter(Name=SIGNING_PARAMETER, Value=SOME_SECRET, Type="SecureString")

    unsigned, signed = signing_configured.post(), signing_configured.post(signed_with=SOME_SECRET)

    assert (unsigned.status_code, signed.status_code) == (401, 200)
    assert signed.json() == {"queued": True}
    assert len(signing_configured.queued()) == 1


# -- SSM failures are a 503, never a cached 401 ------------------------------------------------------------------


# Powertools' get_parameters_by_name swallowed the first two (modelled SSM errors) and reported the token as
# missing; botocore retries the 500 and the throttling three times before giving up, the KMS error not at all.
@pytest.mark.parametrize(
    ("code", "status", "attempts"),
    [("InternalServerError", 500, 4), ("InvalidKeyId", 400, 1), ("ThrottlingException", 400, 4)],
)
def test_an_ssm_failure_is_an_uncached_503(webhook: Webhook, code: str, status: int, attempts: int) -> None:
    # given SSM fails every attempt (botocore's retries included) when the secret is first read
    webhook.runtime.reset()
    with WireFaults(webhook.ssm) as faults:
        faults.fail("GetParameters", code, status=status)
        # when two deliveries arrive while SSM still fails
        during = [webhook.post().status_code, webhook.post().status_code]
    # and another once SSM answers again
    after = webhook.post()

    # then each failed answer said "ours failed", the failure was not cached, and the later delivery was queued
    assert during == [503, 503]
    assert len(faults.calls_to("GetParameters")) == 2
    assert faults.attempts("GetParameters") == 2 * attempts
    assert (after.status_code, after.json()) == (200, {"queued": True})
    assert len(webhook.queued()) == 1


def test_a_missing_token_is_cached_and_refuses_every_request(webhook: Webhook) -> None:
    # given the token parameter does not exist
    webhook.ssm.delete_parameter(Name=webhook.token_parameter)
    webhook.runtime.reset()
    with WireFaults(webhook.ssm) as faults:
        # when three deliveries arrive
        answers = [webhook.post().status_code for _ in range(3)]
    # then every one is refused and SSM was asked once: "missing" is an answer, not a failure
    assert answers == [401, 401, 401]
    assert len(faults.calls_to("GetParameters")) == 1
    assert webhook.queued() == []


# -- secrets never reach a log line or a repr ---------------------------------------------------------------------


def test_secrets_do_not_show_in_their_repr(signing_configured: Webhook) -> None:
    from chalicelib.intake.secrets import WebhookSecretSource

    webhook = signing_configured
    # given both secrets readable from SSM
    webhook.ssm.put_parameter(Name=SIGNING_PARAMETER, Value=SOME_SECRET, Type="SecureString")
    secrets = WebhookSecretSource(webhook.ssm, webhook.token_parameter, SIGNING_PARAMETER).get()
    # when
    shown = repr(secrets)
    # then
    assert secrets.token == webhook.token and secrets.signing_secret == SOME_SECRET
    assert webhook.token not in shown and SOME_SECRET not in shown


def test_powertools_log_event_does_not_log_the_token(
    webhook: Webhook, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from chalice.test import Client

    import app
    from chalicelib.observability import SERVICE

    # given the variable that makes Powertools log every event whole, and INFO logs on (as deployed)
    monkeypatch.setenv("POWERTOOLS_LOGGER_LOG_EVENT", "true")
    caplog.set_level(logging.INFO, logger=SERVICE)
    # when a webhook is invoked through the app's handler and its middlewares
    with Client(app.app) as client:
        response = client.http.post(
            "/webhooks/gitlab", headers=gitlab_headers(webhook.token), body=json.dumps(job_hook("pending"))
        )
    # then the webhook was handled and logged, and no line holds the token
    logged = [record.getMessage() for record in caplog.records]
    assert response.status_code == 200
    assert "job queued" in logged
    assert not [line for line in logged if webhook.token in line]
