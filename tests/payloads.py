"""Test payloads in GitLab's documented shapes (webhook_events.md "Job events"), written for runner-fleet."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

_ids = itertools.count(5000)


def next_job_id() -> int:
    return next(_ids)


def job_hook(
    status: str = "pending",
    *,
    build_id: int | None = None,
    project_id: int = 380,
    pipeline_id: int = 2366,
    legacy_times: bool = False,
    runner: dict[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    build_id = build_id if build_id is not None else next_job_id()
    created = "2021-02-23 02:41:37 UTC" if legacy_times else "2021-02-23T02:41:37.886Z"
    body: dict[str, Any] = {
        "object_kind": "build",
        "ref": "main",
        "tag": False,
        "before_sha": "2293ada6b400935a1378653304eaf6221e0fdb8f",
        "sha": "2293ada6b400935a1378653304eaf6221e0fdb8f",
        "build_id": build_id,
        "build_name": "test",
        "build_stage": "test",
        "build_status": status,
        "build_created_at": created,
        "build_started_at": None,
        "build_finished_at": None,
        "build_duration": None,
        "build_queued_duration": 1095.588715,
        "build_allow_failure": False,
        "build_failure_reason": "unknown_failure",
        "retries_count": 0,
        "pipeline_id": pipeline_id,
        "project_id": project_id,
        "project_name": "gitlab-org/gitlab-test",
        "user": {"id": 3, "name": "User", "email": "user@example.com"},
        "commit": {"id": pipeline_id, "name": "Build pipeline", "sha": "2293ada6", "status": status},
        "repository": {"name": "gitlab_test", "homepage": "http://gitlab.example.com/gitlab-org/gitlab-test"},
        "project": {"id": project_id, "name": "Gitlab Test", "path_with_namespace": "gitlab-org/gitlab-test"},
        "runner": runner,
        "environment": None,
    }
    if not legacy_times:
        body["build_created_at_iso"] = "2021-02-23T02:41:37Z"
        body["build_started_at_iso"] = None
        body["build_finished_at_iso"] = None
    body.update(overrides)
    return body


def gitlab_headers(token: str | None, event: str = "Job Hook", key: str | None = None) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitLab/17.9.0",
        "X-Gitlab-Event": event,
        "X-Gitlab-Instance": "https://gitlab.example.com",
        "X-Gitlab-Webhook-UUID": "02affd2d-2cba-4033-917d-ec22d5dc4b38",
        "X-Gitlab-Event-UUID": str(uuid.uuid4()),
        "Idempotency-Key": key or str(uuid.uuid4()),
    }
    if token is not None:
        headers["X-Gitlab-Token"] = token
    return headers
