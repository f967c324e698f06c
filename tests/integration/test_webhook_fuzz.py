"""Property: an authenticated delivery, whatever its body and headers, never gets a 5xx and never queues a job
that is not a valid pending Job Hook. Run on ``WebhookIntake.handle`` with moto server behind it.

``handle`` lets only our own dependencies' failures escape (the handler boundary answers those 503); moto is
healthy here, so anything escaping is a body or a header that the intake could not take. The explicit examples
are the inputs that escaped before the model and the headers were bounded.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from chalicelib.intake.job_hooks import JobStatus, parse_job_hook
from tests.fuzzing import FUZZ, assert_valid_hook, bodies, deep_body, encode, strings
from tests.payloads import gitlab_headers, job_hook

DOCUMENTED_STATUSES = {200, 400, 401, 413}

header_values = strings | st.text(st.characters(codec="latin-1"), max_size=200)
header_names = ("Idempotency-Key", "X-Gitlab-Event-UUID", "X-Gitlab-Instance", "X-Gitlab-Event")


@st.composite
def header_sets(draw: st.DrawFn) -> dict[str, str]:
    """The documented headers with the token kept, some values replaced by hostile text or removed."""
    headers = gitlab_headers("placeholder")
    for name in header_names:
        change = draw(st.sampled_from(["keep", "keep", "keep", "hostile", "drop"]))
        if change == "hostile":
            headers[name] = draw(header_values)
        elif change == "drop":
            del headers[name]
    return headers


def _drain(sqs: Any, url: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while batch := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages"):
        for message in batch:
            messages.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return messages


def _case(name: str, body: bytes, headers: dict[str, str], reason: str) -> Any:
    return pytest.param(body, headers, reason, id=name)


# The first four escaped the intake as exceptions (the handler answered 503) before the bounds; the last two were
# queued whole, as SQS messages over 256 KB, which a queue with SQS's former default MaximumMessageSize refuses
# (moto's queues take 1 MiB, SQS's limit since 2025).
REGRESSIONS = [
    _case("nested 100 000 deep", deep_body(100_000), {}, "nested too deeply"),
    _case("name larger than an item", encode(job_hook("pending", build_name="n" * 420_000)), {}, "$.build_name"),
    _case(
        "description larger than an item",
        encode(job_hook("running", runner={"id": 1, "description": "d" * 420_000})),
        {},
        "$.runner.description",
    ),
    _case("lone surrogate in the instance", encode(job_hook()), {"X-Gitlab-Instance": "\ud800"}, "X-Gitlab-Instance"),
    _case("name larger than a message", encode(job_hook("pending", build_name="n" * 270_000)), {}, "$.build_name"),
    _case(
        "instance larger than a message", encode(job_hook()), {"X-Gitlab-Instance": "i" * 270_000}, "X-Gitlab-Instance"
    ),
]


@pytest.mark.parametrize(("body", "headers", "reason"), REGRESSIONS)
def test_content_the_stores_cannot_take_gets_400_naming_the_field(
    fresh_sandbox: Any, body: bytes, headers: dict[str, str], reason: str
) -> None:
    from chalicelib import runtime

    # given an authenticated delivery whose content the stores could not take
    delivery = {**gitlab_headers(fresh_sandbox.secrets()["token"]), **headers}
    # when
    response = runtime.webhook_intake().handle(delivery, body)
    # then
    assert response.status == 400
    assert reason in response.body["error"]
    assert _drain(runtime.aws().sqs, runtime.jobs_queue().url) == []


def test_authenticated_deliveries_never_get_a_5xx_nor_queue_an_invalid_job(fresh_sandbox: Any) -> None:
    from chalicelib import runtime

    token = fresh_sandbox.secrets()["token"]
    intake = runtime.webhook_intake()
    sqs, url = runtime.aws().sqs, runtime.jobs_queue().url

    @FUZZ
    @given(bodies(), header_sets())
    @example(deep_body(100_000), gitlab_headers("t")).via("RecursionError in the decoder")
    @example(encode(job_hook("pending", build_name="n" * 420_000)), gitlab_headers("t")).via("item > 400 KB")
    @example(encode(job_hook("pending", build_name="n" * 270_000)), gitlab_headers("t")).via("message > 256 KB")
    @example(encode(job_hook("pending")), {**gitlab_headers("t"), "X-Gitlab-Instance": "i" * 270_000}).via(
        "an X-Gitlab-Instance header longer than an SQS message"
    )
    @example(encode(job_hook("pending")), {**gitlab_headers("t"), "X-Gitlab-Instance": "\ud800"}).via(
        "a lone surrogate in X-Gitlab-Instance"
    )
    def deliver(body: bytes, headers: dict[str, str]) -> None:
        # given an authenticated delivery
        headers = {**headers, "X-Gitlab-Token": token}
        # when
        response = intake.handle(headers, body)
        queued = _drain(sqs, url)
        event(f"{response.status} {next(iter(response.body), '')}")  # the mix, with --hypothesis-show-statistics
        # then
        assert response.status in DOCUMENTED_STATUSES, response
        assert len(json.dumps(response.body)) < 512
        if response.body != {"queued": True}:
            assert queued == []
            return
        hook = parse_job_hook(body)
        assert_valid_hook(hook)
        assert hook.status is JobStatus.PENDING
        [message] = queued
        assert (message["project_id"], message["job_id"]) == (hook.project_id, hook.build_id)
        assert message["pipeline_id"] == hook.pipeline_id and message["job_name"] == hook.build_name

    deliver()
