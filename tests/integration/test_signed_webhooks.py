"""Standard Webhooks signatures over real HTTP, on a stage configured with a signing secret.

GitLab (the emulator) signs every request it sends; runner-fleet accepts those, refuses a bad or stale
signature, refuses an exact replay of a captured request, and treats a resend (same id, fresh timestamp) as the
duplicate it is.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from chalicelib.intake.signing import sign
from fleetctl.sandbox.stack import DEFAULT_CONFIG, Sandbox
from tests.payloads import gitlab_headers, job_hook

SIGNING_PARAMETER = "/runner-fleet/dev/webhook-signing-secret"


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    workdir = tmp_path_factory.mktemp("signed")
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["webhook"]["signing_secret_parameter"] = SIGNING_PARAMETER
    config = workdir / "signed.yaml"
    config.write_text(yaml.safe_dump(document))
    # Hook signing tokens are honoured from GitLab 19.0, with the webhook_signing_token flag on.
    stack = Sandbox(
        config_path=Path(config),
        workdir=workdir,
        run_pump=False,
        gitlab_version="19.0.0",
        gitlab_features=("webhook_signing_token",),
    )
    stack.start()
    yield stack
    stack.stop()


class Signer:
    def __init__(self, stack: Sandbox) -> None:
        secrets = stack.secrets()
        assert stack.server is not None
        self.url = stack.server.webhook_url
        self.token = secrets["token"]
        self.secret = secrets["signing"]

    def headers(self, body: bytes, *, webhook_id: str, timestamp: int | None = None) -> dict[str, str]:
        timestamp = int(time.time()) if timestamp is None else timestamp
        return {
            **gitlab_headers(self.token, key=webhook_id),
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, webhook_id, timestamp, body),
        }

    def post(self, body: bytes, headers: dict[str, str]) -> requests.Response:
        return requests.post(self.url, data=body, headers=headers, timeout=30)


def _queued() -> list[dict[str, Any]]:
    from chalicelib import runtime

    sqs, url = runtime.aws().sqs, runtime.jobs_queue().url
    bodies: list[dict[str, Any]] = []
    while found := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
        for message in found:
            bodies.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return bodies


def test_gitlab_signed_deliveries_are_accepted(signed: Sandbox) -> None:
    pipeline = signed.gitlab.create_pipeline(signed.project_id, [{"name": "a", "tags": ["docker"]}] * 2)
    signed.gitlab.wait_for_deliveries()

    answers = [d for d in signed.gitlab.deliveries if d.event == "Job Hook"]
    assert answers and {d.status_code for d in answers} == {200}
    jobs = {j["id"] for j in signed.gitlab.jobs_of_pipeline(signed.project_id, pipeline)}
    assert {m["job_id"] for m in _queued()} == jobs


def test_a_tampered_body_is_refused(signed: Sandbox) -> None:
    signer = Signer(signed)
    body = json.dumps(job_hook("pending")).encode()
    headers = signer.headers(body, webhook_id=f"msg_{uuid.uuid4().hex}")

    answer = signer.post(body.replace(b'"main"', b'"evil"'), headers)

    assert answer.status_code == 401
    assert _queued() == []


# Well clear of the 300 s boundary, which tests/unit/test_signing.py pins with an injected clock: over real HTTP a
# loaded machine adds its own latency to the timestamp's age.
@pytest.mark.parametrize("skew", [-360, 360, -3600])
def test_a_timestamp_outside_five_minutes_is_refused(signed: Sandbox, skew: int) -> None:
    signer = Signer(signed)
    body = json.dumps(job_hook("pending")).encode()

    answer = signer.post(
        body, signer.headers(body, webhook_id=f"msg_{uuid.uuid4().hex}", timestamp=int(time.time()) + skew)
    )

    assert answer.status_code == 401
    assert _queued() == []


# A timestamp of hundreds of digits was parsed by int() and then overflowed against the float clock: a 503.
@pytest.mark.parametrize("timestamp", ["1" + "0" * 400, "9" * 5000, "1_800_000_000"])
def test_a_timestamp_that_is_not_plain_digits_is_refused_not_failed(signed: Sandbox, timestamp: str) -> None:
    signer = Signer(signed)
    body = json.dumps(job_hook("pending")).encode()
    headers = signer.headers(body, webhook_id=f"msg_{uuid.uuid4().hex}") | {"webhook-timestamp": timestamp}

    answer = signer.post(body, headers)

    assert answer.status_code == 401
    assert _queued() == []


def test_a_valid_token_without_a_signature_is_refused(signed: Sandbox) -> None:
    signer = Signer(signed)
    body = json.dumps(job_hook("pending")).encode()

    answer = signer.post(body, gitlab_headers(signer.token))

    assert answer.status_code == 401
    assert _queued() == []


def test_an_exact_replay_is_refused_and_a_resend_is_a_duplicate(signed: Sandbox) -> None:
    signer = Signer(signed)
    body = json.dumps(job_hook("pending")).encode()
    webhook_id = f"msg_{uuid.uuid4().hex}"
    captured = signer.headers(body, webhook_id=webhook_id)

    first = signer.post(body, captured)
    replay = signer.post(body, captured)
    resend = signer.post(body, signer.headers(body, webhook_id=webhook_id, timestamp=int(time.time()) + 1))

    assert (first.status_code, first.json()) == (200, {"queued": True})
    assert replay.status_code == 401
    assert (resend.status_code, resend.json()) == (200, {"ignored": "duplicate"})
    assert len(_queued()) == 1
