"""The webhook under GitLab's delivery rules, with the GitLab emulator delivering over HTTP to the served app.

GitLab sends each hook execution once and never again by itself (only a person's resend repeats it), and it
disables a hook after more than 3 consecutive failed deliveries. These tests show what the fleet does about both,
and what ``fleetctl status`` tells the operator.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from click.testing import CliRunner

from fleetctl.sandbox.gitlab_emulator import JobSpec
from tests.faults import WireFaults

pytestmark = pytest.mark.timeout(180)


def aws() -> Any:
    from chalicelib import runtime

    return runtime.aws()


def queued_jobs(sandbox: Any) -> list[int]:
    """Job ids of every message on the jobs queue (consumed: each test starts from a fresh bootstrap)."""
    from chalicelib import runtime

    sqs, url = runtime.aws().sqs, runtime.jobs_queue().url
    found: list[int] = []
    while batch := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
        found.extend(json.loads(m["Body"])["job_id"] for m in batch)
    return found


def job_item(project_id: int, job_id: int) -> dict[str, Any] | None:
    from chalicelib import runtime
    from chalicelib.store import job_key

    return runtime.store().get(job_key(project_id, job_id))


def pending_deliveries(sandbox: Any, job_id: int) -> list[Any]:
    return [
        d
        for d in sandbox.gitlab.deliveries
        if d.payload.get("build_id") == job_id and d.payload.get("build_status") == "pending"
    ]


def status(sandbox: Any, *args: str) -> Any:
    from fleetctl.cli import main
    from fleetctl.sandbox.stack import GITLAB_ADMIN_TOKEN

    return CliRunner().invoke(
        main,
        ["status", "--config", str(sandbox.workdir / "fleet.json"), *args],
        env={"GITLAB_TOKEN": GITLAB_ADMIN_TOKEN},
        catch_exceptions=False,
    )


def test_a_503_is_not_redelivered_and_a_resend_queues_the_job_exactly_once(fresh_sandbox: Any) -> None:
    """GitLab executes a hook once and logs a 503 without trying again (gitlab-org/gitlab
    app/services/web_hook_service.rb); the hook's "Resend request" repeats the delivery with its Idempotency-Key
    (app/services/web_hooks/events/resend_service.rb)."""
    sandbox = fresh_sandbox
    gitlab, project_id = sandbox.gitlab, sandbox.project_id
    # given the jobs queue refuses every send while GitLab delivers a pending job
    with WireFaults(aws().sqs) as faults:
        faults.fail("SendMessage", "ServiceUnavailable")
        pipeline = gitlab.create_pipeline(project_id, [JobSpec("build")])
        gitlab.wait_for_deliveries(timeout=60)
    [job] = gitlab.jobs_of_pipeline(project_id, pipeline)
    [failed] = pending_deliveries(sandbox, job["id"])
    recorded = job_item(project_id, job["id"])
    counted = json.loads(status(sandbox, "--json").output)

    # when someone resends the delivery, and then once more
    resent = gitlab.resend(failed)
    again = gitlab.resend(failed)

    # then the 503 was the only delivery GitLab made, the job stayed recorded and unqueued, and the resend queued
    # it exactly once
    assert failed.status_code == 503
    assert recorded is not None and (recorded["status"], recorded["queued"]) == ("pending", False)
    assert counted["unqueued_jobs"] == 1
    assert (resent.status_code, again.status_code) == (200, 200)
    assert len(pending_deliveries(sandbox, job["id"])) == 3  # the failed one and the two resends, no other
    assert queued_jobs(sandbox) == [job["id"]]
    assert json.loads(status(sandbox, "--json").output)["unqueued_jobs"] == 0


def test_what_the_fleet_misses_while_gitlab_has_disabled_the_hook(fresh_sandbox: Any) -> None:
    """Four failed deliveries in a row (4xx and 5xx alike) disable a project hook for a minute, doubling with each
    further failure; the events of that window are never sent (gitlab-org/gitlab
    app/models/concerns/web_hooks/auto_disabling.rb, app/services/web_hook_service.rb). Jobs that become pending
    then never reach the fleet table; ``fleetctl status`` shows the disabled hook."""
    sandbox = fresh_sandbox
    gitlab, project_id = sandbox.gitlab, sandbox.project_id
    # given the fleet table fails every write while two jobs are created (four Job Hooks: created, pending)
    with WireFaults(aws().dynamodb) as faults:
        faults.fail("UpdateItem", "InternalServerError", status=500)
        failing = gitlab.create_pipeline(project_id, [JobSpec("a"), JobSpec("b")])
        gitlab.wait_for_deliveries(timeout=60)

    # when a job becomes pending after the fleet has recovered, while the hook is disabled
    missed = gitlab.create_pipeline(project_id, [JobSpec("later")])
    gitlab.wait_for_deliveries(timeout=60)
    [later] = gitlab.jobs_of_pipeline(project_id, missed)
    shown = status(sandbox, "--json")
    table = status(sandbox)

    # then four deliveries failed and none was sent for the later job: it waits in GitLab, unknown to the fleet
    assert [d.status_code for d in gitlab.deliveries if d.payload["pipeline_id"] == failing] == [503] * 4
    assert [d for d in gitlab.deliveries if d.payload["pipeline_id"] == missed] == []
    assert later["status"] == "pending"
    assert job_item(project_id, later["id"]) is None
    assert queued_jobs(sandbox) == []
    [hook] = json.loads(shown.output)["hooks"]
    assert (hook["project_id"], hook["alert_status"], hook["error"]) == (project_id, "temporarily_disabled", None)
    assert hook["disabled_until"] is not None
    assert "temporarily_disabled" in table.output and table.exit_code == 0


def test_status_reports_a_gitlab_it_cannot_ask_and_still_answers(fresh_sandbox: Any) -> None:
    """Reading a hook is one ``GET /projects/:id/hooks/:hook_id`` (https://docs.gitlab.com/api/project_webhooks/);
    a GitLab that errors or cannot be reached is reported per hook, and status still shows the fleet."""
    from chalicelib import runtime

    sandbox = fresh_sandbox
    # given a second recorded hook on a GitLab nobody listens on, and GitLab failing the first hook's read
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{closed.getsockname()[1]}"
    runtime.store().record_hook(999_999, 7, gone, sandbox.server.webhook_url)
    sandbox.gitlab.fail_next("GET", r"/projects/\d+/hooks/\d+", status=502)

    # when
    result = status(sandbox, "--json")

    # then
    assert result.exit_code == 0
    summary = json.loads(result.output)
    errors = {h["project_id"]: (h["alert_status"], h["error"]) for h in summary["hooks"]}
    assert errors == {
        sandbox.project_id: (None, "GitLab answered 502: 502 Bad Gateway"),
        999_999: (None, "GitLab unreachable: ConnectionError"),
    }
    assert summary["pools"]
