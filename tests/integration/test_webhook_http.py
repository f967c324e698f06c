"""The webhook's status contract, over real HTTP to the served app, with moto server behind it."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.payloads import gitlab_headers, job_hook, next_job_id

MiB = 1024 * 1024


class Client:
    """Posts to the served webhook and reads what reached the fleet table and the jobs queue."""

    def __init__(self, sandbox: Any) -> None:
        from chalicelib import runtime

        self.sandbox = sandbox
        self.url = sandbox.server.webhook_url
        self.token = sandbox.secrets()["token"]
        self.runtime = runtime

    def post(
        self,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        method: str = "POST",
        url: str | None = None,
    ) -> requests.Response:
        data = raw if raw is not None else json.dumps(body).encode()
        return requests.request(
            method,
            url or self.url,
            data=data,
            headers=headers if headers is not None else gitlab_headers(self.token),
            timeout=30,
        )

    def queued(self) -> list[dict[str, Any]]:
        """Every message on the jobs queue (consumed: each test starts from a fresh bootstrap)."""
        sqs = self.runtime.aws().sqs
        url = self.runtime.jobs_queue().url
        messages: list[dict[str, Any]] = []
        while True:
            found = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
            batch = found.get("Messages", [])
            if not batch:
                return messages
            messages.extend(json.loads(m["Body"]) for m in batch)

    def job(self, project_id: int, job_id: int) -> dict[str, Any] | None:
        from chalicelib.store import job_key

        return self.runtime.store().get(job_key(project_id, job_id))


@pytest.fixture
def client(fresh_sandbox: Any) -> Client:
    return Client(fresh_sandbox)


# -- the status contract, row by row ------------------------------------------------------------------------------


def test_pending_job_hook_is_queued_with_what_scale_up_needs(client: Client) -> None:
    # given
    body = job_hook("pending", project_id=77, pipeline_id=900)
    # when
    response = client.post(body)
    # then
    assert response.status_code == 200
    assert response.json() == {"queued": True}
    [message] = client.queued()
    assert message["project_id"] == 77
    assert message["job_id"] == body["build_id"]
    assert message["pipeline_id"] == 900
    assert message["gitlab_instance"] == "https://gitlab.example.com"
    assert message["received_at"] > 0
    assert client.job(77, body["build_id"])["status"] == "pending"


@pytest.mark.parametrize("status", ["created", "running", "success", "failed", "canceled", "skipped", "manual"])
def test_other_statuses_are_recorded_not_queued(client: Client, status: str) -> None:
    runner = {"id": 42, "description": "runner-fleet i-0abc", "tags": ["docker"], "active": True}
    body = job_hook(status, runner=runner, build_failure_reason="runner_system_failure")

    response = client.post(body)

    assert response.status_code == 200
    assert response.json() == {"recorded": status}
    assert client.queued() == []
    record = client.job(380, body["build_id"])
    assert record["status"] == status
    assert record["runner_id"] == 42
    assert record["runner_description"] == "runner-fleet i-0abc"
    assert record.get("failure_reason") == ("runner_system_failure" if status == "failed" else None)


def test_finished_job_records_expire_and_late_events_do_not_rewind_them(client: Client) -> None:
    body = job_hook("success")
    assert client.post(body).status_code == 200

    late = client.post(job_hook("pending", build_id=body["build_id"]))

    assert late.json() == {"ignored": "stale"}
    record = client.job(380, body["build_id"])
    assert record["status"] == "success"
    assert record["ttl"] > record["updated_at"]
    assert client.queued() == []


@pytest.mark.parametrize("event", ["Push Hook", "Pipeline Hook", "Merge Request Hook", "System Hook"])
def test_other_events_with_a_valid_token_are_ignored_with_200(client: Client, event: str) -> None:
    response = client.post({"object_kind": "push"}, headers=gitlab_headers(client.token, event=event))

    assert response.status_code == 200
    assert response.json() == {"ignored": f"event {event}"}
    assert client.queued() == []


def test_a_redelivered_hook_is_dropped_as_a_duplicate(client: Client) -> None:
    body = job_hook("pending")
    headers = gitlab_headers(client.token, key="retry-key-1")

    first = client.post(body, headers=headers)
    again = client.post(body, headers={**headers, "X-Gitlab-Event-UUID": "another-uuid"})

    assert first.json() == {"queued": True}
    assert again.status_code == 200
    assert again.json() == {"ignored": "duplicate"}
    assert len(client.queued()) == 1


def test_unconfigured_secret_refuses_every_request(client: Client) -> None:
    # given a fleet whose webhook token parameter does not exist
    config = client.sandbox.config
    client.runtime.aws().ssm.delete_parameter(Name=config.webhook.token_parameter)
    client.runtime.reset()
    # when any token, or none, is sent
    answers = [client.post(job_hook(), headers=gitlab_headers(t)).status_code for t in (client.token, "", None)]
    # then
    assert answers == [401, 401, 401]
    assert client.queued() == []


def test_internal_failure_is_503_without_detail(client: Client) -> None:
    # given the fleet table is gone (a real DynamoDB error, from moto server)
    client.runtime.aws().dynamodb.delete_table(TableName=client.sandbox.config.state.table)

    response = client.post(job_hook("pending"))

    assert response.status_code == 503
    assert response.json() == {"error": "unavailable"}
    assert "Traceback" not in response.text and "ResourceNotFound" not in response.text


def test_a_job_whose_record_is_full_of_deliveries_gets_413_not_503(client: Client) -> None:
    from chalicelib.store import job_key

    # given a job whose item holds so many delivery keys that it is a few hundred bytes short of 400 KB
    body = job_hook("pending")
    client.runtime.aws().dynamodb.update_item(
        TableName=client.sandbox.config.state.table,
        Key={"pk": {"S": job_key(380, body["build_id"])}},
        UpdateExpression="SET kind = :kind, status_rank = :rank ADD deliveries :keys",
        ExpressionAttributeValues={
            ":kind": {"S": "job"},
            ":rank": {"N": "1"},
            ":keys": {"SS": [f"{n:04d}" + "k" * 124 for n in range(3196)]},
        },
    )
    # when one more distinct delivery arrives for it
    response = client.post(body)
    # then GitLab is told not to retry (a retry could never fit), and nothing is queued
    assert (response.status_code, response.json()) == (413, {"error": "job record full"})
    assert client.queued() == []


def test_a_delivery_write_whose_answer_was_lost_still_queues_the_job(client: Client) -> None:
    from tests.faults import WireFaults

    # the job's write reaches DynamoDB, its answer times out, and botocore sends it again
    body = job_hook("pending")
    with WireFaults(client.runtime.aws().dynamodb) as faults:
        faults.lose_answer("UpdateItem")
        response = client.post(body)

    assert faults.attempts("UpdateItem") == 3  # the job's write twice, then its queued mark
    assert (response.status_code, response.json()) == (200, {"queued": True})
    assert [m["job_id"] for m in client.queued()] == [body["build_id"]]


def test_a_failed_send_leaves_the_job_recorded_unqueued_and_a_resend_queues_it_once(client: Client) -> None:
    """GitLab never redelivers a delivery answered 503 (app/services/web_hook_service.rb); only a resend repeats
    its Idempotency-Key (app/services/web_hooks/events/resend_service.rb)."""
    from tests.faults import WireFaults

    # given the jobs queue refuses every send (botocore's retries included) when the delivery arrives
    body = job_hook("pending")
    job = (body["project_id"], body["build_id"])
    headers = gitlab_headers(client.token, key="delivery-that-fails-once")
    store = client.runtime.store()
    with WireFaults(client.runtime.aws().sqs) as faults:
        faults.fail("SendMessage", "ServiceUnavailable")
        first = client.post(body, headers=headers)
    recorded = client.job(*job)
    unqueued = list(store.unqueued_pending_jobs())

    # when the same delivery is resent (same Idempotency-Key, a new X-Gitlab-Event-UUID), twice
    resent = client.post(body, headers={**headers, "X-Gitlab-Event-UUID": "resend-1"})
    again = client.post(body, headers={**headers, "X-Gitlab-Event-UUID": "resend-2"})

    # then the failed answer left the job recorded as pending and not queued, and the first resend queued it once
    assert faults.attempts("SendMessage") > 1
    assert (first.status_code, first.json()) == (503, {"error": "unavailable"})
    assert recorded is not None and (recorded["status"], recorded["queued"]) == ("pending", False)
    assert [(j.project_id, j.job_id) for j in unqueued] == [job]
    assert (resent.status_code, resent.json()) == (200, {"queued": True})
    assert (again.status_code, again.json()) == (200, {"ignored": "duplicate"})
    assert [m["job_id"] for m in client.queued()] == [body["build_id"]]
    marked = client.job(*job)
    assert marked is not None and marked["queued"] is True and marked["queued_at"] >= marked["pending_at"]
    assert list(store.unqueued_pending_jobs()) == []


def test_a_second_delivery_of_a_queued_job_does_not_queue_it_again(client: Client) -> None:
    # given a pending job queued by one hook's delivery
    body = job_hook("pending")
    first = client.post(body, headers=gitlab_headers(client.token, key="from-the-project-hook"))
    # when a second hook (another Idempotency-Key) delivers the same event
    second = client.post(body, headers=gitlab_headers(client.token, key="from-another-hook"))
    # then
    assert first.json() == {"queued": True}
    assert (second.status_code, second.json()) == (200, {"ignored": "already queued"})
    assert len(client.queued()) == 1


def test_a_lost_queued_mark_still_answers_200(client: Client) -> None:
    from tests.faults import WireFaults

    # given the message is sent but every write of the queued mark fails
    body = job_hook("pending")
    with WireFaults(client.runtime.aws().dynamodb) as faults:
        faults.fail("UpdateItem", "InternalServerError", status=500, after=1)
        response = client.post(body)
    # then GitLab hears of success (the job is queued), and the job stays findable as unqueued for a sweep
    assert (response.status_code, response.json()) == (200, {"queued": True})
    assert [m["job_id"] for m in client.queued()] == [body["build_id"]]
    assert [j.job_id for j in client.runtime.store().unqueued_pending_jobs()] == [body["build_id"]]


def test_unqueued_jobs_are_listed_only_once_old_enough(client: Client) -> None:
    from tests.faults import WireFaults

    # given a job whose send failed
    body = job_hook("pending")
    with WireFaults(client.runtime.aws().sqs) as faults:
        faults.fail("SendMessage", "ServiceUnavailable")
        client.post(body)
    recorded = client.job(body["project_id"], body["build_id"])
    assert recorded is not None
    store = client.runtime.store()
    # then a sweep that leaves in-flight sends alone sees it only after it was recorded
    assert list(store.unqueued_pending_jobs(recorded_before=recorded["pending_at"])) == []
    [found] = store.unqueued_pending_jobs(recorded_before=recorded["pending_at"] + 1)
    assert (found.project_id, found.job_id, found.pipeline_id) == (
        body["project_id"],
        body["build_id"],
        body["pipeline_id"],
    )


# -- thirty-odd bad inputs: each gets its documented status, never a 500, and nothing is queued ------------------


def _bad_inputs(token: str, url: str) -> list[tuple[str, dict[str, Any], int | tuple[int, ...]]]:
    good = json.dumps(job_hook("pending")).encode()

    def without(field: str) -> bytes:
        body = job_hook("pending")
        del body[field]
        return json.dumps(body).encode()

    def with_field(**fields: Any) -> bytes:
        return json.dumps(job_hook("pending", **fields)).encode()

    def hostile(**fields: Any) -> bytes:
        return json.dumps(job_hook("running", **fields)).encode()

    return [
        ("missing token", {"headers": gitlab_headers(None), "raw": good}, 401),
        ("empty token", {"headers": gitlab_headers(""), "raw": good}, 401),
        ("wrong token", {"headers": gitlab_headers("not-the-token"), "raw": good}, 401),
        ("token prefix", {"headers": gitlab_headers(token[:-1]), "raw": good}, 401),
        ("token with extra char", {"headers": gitlab_headers(token + "x"), "raw": good}, 401),
        ("token case flipped", {"headers": gitlab_headers(token.swapcase()), "raw": good}, 401),
        ("token with a space inside", {"headers": gitlab_headers(f"{token[:5]} {token[5:]}"), "raw": good}, 401),
        ("over-long token", {"headers": gitlab_headers("x" * 8000), "raw": good}, 401),
        (
            "token in wrong header",
            {"headers": {**gitlab_headers(None), "Authorization": f"Bearer {token}"}, "raw": good},
            401,
        ),
        ("GET", {"method": "GET", "raw": b""}, (403, 404, 405)),
        ("PUT", {"method": "PUT", "raw": good}, (403, 404, 405)),
        ("DELETE", {"method": "DELETE", "raw": b""}, (403, 404, 405)),
        ("wrong path", {"url": url.replace("/gitlab", "/github"), "raw": good}, (403, 404)),
        ("path prefix", {"url": url.rsplit("/", 1)[0], "raw": good}, (403, 404)),
        ("empty body", {"raw": b""}, 400),
        ("truncated JSON", {"raw": good[: len(good) // 2]}, 400),
        ("not JSON", {"raw": b"build_id=1&project_id=2"}, 400),
        ("JSON array", {"raw": b"[1, 2, 3]"}, 400),
        ("JSON string", {"raw": b'"pending"'}, 400),
        ("JSON null", {"raw": b"null"}, 400),
        ("non-UTF-8 body", {"raw": b'{"build_id": "\xff\xfe"}'}, 400),
        ("oversized body", {"raw": b'{"pad": "' + b"a" * (MiB + 10) + b'"}'}, 413),
        ("missing build_id", {"raw": without("build_id")}, 400),
        ("missing project_id", {"raw": without("project_id")}, 400),
        ("missing build_status", {"raw": without("build_status")}, 400),
        ("build_id as string", {"raw": with_field(build_id="123")}, 400),
        ("build_id negative", {"raw": with_field(build_id=-4)}, 400),
        ("build_id boolean", {"raw": with_field(build_id=True)}, 400),
        ("project_id as float", {"raw": with_field(project_id=1.5)}, 400),
        ("build_status as number", {"raw": with_field(build_status=3)}, 400),
        ("build_status null", {"raw": with_field(build_status=None)}, 400),
        ("bad timestamp", {"raw": with_field(build_created_at="yesterday")}, 400),
        ("runner not an object", {"raw": with_field(runner="i-123")}, 400),
        ("wrong object_kind", {"raw": with_field(object_kind="pipeline")}, 400),
        ("unknown build_status", {"raw": with_field(build_status="exploded")}, 200),
        (
            "hostile job name",
            {"raw": hostile(build_name="'; DROP TABLE jobs; --<script>alert(1)</script>")},
            200,
        ),
        ("hostile ref", {"raw": hostile(ref="$(rm -rf /)`reboot`\u202e\u0000")}, 200),
        ("name beyond 255 characters", {"raw": hostile(build_name="n" * 256)}, 400),
        ("very long name", {"raw": hostile(build_name="n" * 50_000)}, 400),
        ("name larger than a DynamoDB item", {"raw": hostile(build_name="n" * 420_000)}, 400),
        ("build_id beyond signed 64-bit", {"raw": with_field(build_id=2**63)}, 400),
        ("build_id beyond 38 digits", {"raw": with_field(build_id=10**40)}, 400),
        ("retries_count huge", {"raw": with_field(retries_count=10**30)}, 400),
        ("object_kind huge", {"raw": with_field(object_kind="k" * 100_000)}, 400),
        ("nested 100 000 deep", {"raw": good[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"}, 400),
        (
            "control characters in X-Gitlab-Instance",
            {"headers": {**gitlab_headers(token), "X-Gitlab-Instance": "a\tb"}, "raw": good},
            400,
        ),
        ("unicode project name", {"raw": hostile(project_name="プロジェクト 🚀 \ud7ff")}, 200),
    ]


def test_bad_inputs_get_their_documented_status_and_queue_nothing(client: Client) -> None:
    cases = _bad_inputs(client.token, client.url)
    assert len(cases) >= 30
    outcomes = {}
    for name, kwargs, _expected in cases:
        response = client.post(**kwargs)
        outcomes[name] = response.status_code
        assert response.status_code != 500, name
        assert len(response.content) < 512, name  # small bodies: GitLab stores what it gets back
    wrong = {
        name: outcomes[name]
        for name, _kwargs, expected in cases
        if outcomes[name] not in (expected if isinstance(expected, tuple) else (expected,))
    }
    assert wrong == {}
    assert client.queued() == []


# -- concurrency and volume ---------------------------------------------------------------------------------------


def test_the_same_delivery_sent_five_times_at_once_queues_one_message(client: Client) -> None:
    body = job_hook("pending")
    headers = gitlab_headers(client.token, key="concurrent-delivery")

    with ThreadPoolExecutor(max_workers=5) as pool:
        answers = list(pool.map(lambda _: client.post(body, headers=headers), range(5)))

    assert {a.status_code for a in answers} == {200}
    assert sorted(json.dumps(a.json()) for a in answers).count('{"queued": true}') == 1
    assert [m["job_id"] for m in client.queued()] == [body["build_id"]]


def test_a_burst_of_200_deliveries_loses_nothing(client: Client) -> None:
    bodies = [job_hook("pending", project_id=9) for _ in range(200)]

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda b: client.post(b), bodies))

    assert [a.status_code for a in answers] == [200] * 200
    assert sorted(m["job_id"] for m in client.queued()) == sorted(b["build_id"] for b in bodies)


def test_a_queue_claim_left_by_a_webhook_that_died_lapses(client: Client) -> None:
    from chalicelib.intake.job_hooks import JobStatus
    from chalicelib.store import QUEUE_CLAIM_SECONDS, EventOutcome, FleetStore, JobEvent

    # given a pending job recorded by a webhook that died before sending (its queue claim still held)
    now = [1_000.0]
    store = FleetStore(client.sandbox.config.state.table, client.runtime.aws().dynamodb, clock=lambda: now[0])
    event = JobEvent(project_id=5, job_id=next_job_id(), status=JobStatus.PENDING, received_at=now[0])
    first = store.record_job_event("delivery-1", event)
    # when the delivery is resent at once, and again once the claim has lapsed
    soon = store.record_job_event("delivery-1", event)
    now[0] += QUEUE_CLAIM_SECONDS + 1
    later = store.record_job_event("delivery-1", event)
    after = store.record_job_event("delivery-1", event)
    # then only the resend after the lapse may queue the job, under a claim of its own; the next is a duplicate
    assert first.outcome is EventOutcome.RECORDED and first.claim is not None
    assert (soon.outcome, soon.claim) == (EventOutcome.DUPLICATE, None)
    assert later.outcome is EventOutcome.UNQUEUED and later.claim not in (None, first.claim)
    assert (after.outcome, after.claim) == (EventOutcome.DUPLICATE, None)
