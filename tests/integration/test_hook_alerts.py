"""Reconcile reads each connected hook back from GitLab and reports one GitLab no longer executes.

GitLab disables a hook after more than 3 failed deliveries in a row (for a minute, doubling up to a day, then for
good after 40), and sends its events to nobody meanwhile; a deleted hook sends nothing either. Reconcile's turn of
the connected hooks (``GET /projects/:id/hooks/:hook_id`` on the GitLab emulator, which disables hooks as GitLab
does) turns each such hook into an error log naming the project and the ``HooksDisabled`` metric the stack's
``hooks-disabled`` alarm watches.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
import requests

from chalicelib import runtime
from chalicelib.lifecycle.reconcile import RunReport, build_reconciler
from chalicelib.observability import metrics
from chalicelib.store import hook_key
from fleetctl.sandbox.stack import GITLAB_OPERATOR_TOKEN

pytestmark = pytest.mark.timeout(180)


def _reconcile(sandbox: Any) -> RunReport:
    sandbox.aws.settle()
    return build_reconciler(sandbox.config, runtime.aws(), runtime.gitlab_api(), runtime.scale_up).run()


def _emitted(output: str) -> int:
    """``HooksDisabled`` as the EMF documents on standard output count it."""
    documents = [json.loads(line) for line in output.splitlines() if line.startswith("{") and '"_aws"' in line]
    return int(sum(sum(document.get("HooksDisabled", [])) for document in documents))


def _not_delivering(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The structured errors reconcile logged for hooks GitLab does not execute."""
    return [
        vars(record)
        for record in caplog.records
        if record.levelname == "ERROR" and record.getMessage() == "GitLab hook not delivering"
    ]


def _hook_api(sandbox: Any, method: str, hook_id: int, **kwargs: Any) -> requests.Response:
    url = f"{sandbox.gitlab.url}/api/v4/projects/{sandbox.project_id}/hooks/{hook_id}"
    return requests.request(method, url, headers={"PRIVATE-TOKEN": GITLAB_OPERATOR_TOKEN}, timeout=10, **kwargs)


def _connected_hook(sandbox: Any) -> int:
    return int(runtime.store().get(hook_key(sandbox.project_id))["hook_id"])


def test_a_hook_gitlab_disabled_is_reported_by_reconcile(
    fresh_sandbox: Any,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")  # the suite turns metrics off; this test reads them
    sandbox = fresh_sandbox
    hook_id = _connected_hook(sandbox)
    quiet = _reconcile(sandbox)
    assert "HooksDisabled" not in quiet.metrics and not _not_delivering(caplog)

    # given: the hook's URL answers nobody, and a pipeline whose Job Hooks fail to reach it four times in a row
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/webhooks/gitlab"
    assert _hook_api(sandbox, "PUT", hook_id, json={"url": dead_url}).status_code == 200
    sandbox.gitlab.create_pipeline(sandbox.project_id, [{"name": f"build-{n}", "tags": ["docker"]} for n in range(4)])
    deadline = time.monotonic() + 60
    while sandbox.gitlab.hook(sandbox.project_id, hook_id)["alert_status"] == "executable":
        assert time.monotonic() < deadline, "GitLab never disabled the hook"
        time.sleep(0.2)

    # when
    report = _reconcile(sandbox)
    metrics.flush_metrics()

    # then: counted, emitted for the alarm, and logged as an error naming the project
    assert report.metrics["HooksDisabled"] == 1
    assert _emitted(capfd.readouterr().out) == 1
    [error] = _not_delivering(caplog)
    assert (error["project_id"], error["hook_id"], error["alert_status"]) == (
        sandbox.project_id,
        hook_id,
        "temporarily_disabled",
    )
    assert error["disabled_until"]


def test_a_deleted_hook_is_reported_as_missing(
    fresh_sandbox: Any,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    sandbox = fresh_sandbox
    hook_id = _connected_hook(sandbox)
    capfd.readouterr()

    # given: someone deleted the connected hook in GitLab
    assert _hook_api(sandbox, "DELETE", hook_id).status_code == 204

    # when
    report = _reconcile(sandbox)
    metrics.flush_metrics()

    # then
    assert report.metrics["HooksDisabled"] == 1
    assert _emitted(capfd.readouterr().out) == 1
    [error] = _not_delivering(caplog)
    assert (error["project_id"], error["alert_status"]) == (sandbox.project_id, "missing")
