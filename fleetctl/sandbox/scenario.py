"""The demo scenario behind ``make demo``: a pipeline's jobs travel from GitLab to the jobs queue.

It starts the whole sandbox, creates a pipeline of jobs in the GitLab emulator, lets the emulator deliver its
Job Hooks over HTTP to the served webhook, and then checks what a user would check: every hook answered 200,
every job recorded, every pending job queued exactly once, a cancelled job recorded as cancelled.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import requests
from rich.console import Console
from rich.table import Table

from fleetctl.sandbox.stack import DEFAULT_WORKDIR, GITLAB_ADMIN_TOKEN, Sandbox

TAG_PATTERN: list[list[str]] = [["docker", "linux"], ["docker", "dind"], [], ["docker"]]


def _queued_messages(stack: Sandbox) -> list[dict[str, Any]]:
    """Read (without consuming) every message on the jobs queue."""
    from chalicelib import runtime

    sqs = runtime.aws().sqs
    url = runtime.jobs_queue().url
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(20):
        found = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=30, WaitTimeSeconds=0)
        messages = found.get("Messages", [])
        if not messages:
            break
        for message in messages:
            seen[message["MessageId"]] = json.loads(message["Body"])
    return list(seen.values())


def run_demo(jobs: int = 6, console: Console | None = None) -> dict[str, Any]:
    console = console or Console(highlight=False, width=120)
    started = time.monotonic()
    with Sandbox(workdir=DEFAULT_WORKDIR / "demo") as stack:
        console.print(f"[bold]runner-fleet sandbox[/bold]  AWS {stack.aws.endpoint_url}  GitLab {stack.gitlab.url}")
        for line in stack.bootstrap():
            console.print(f"  bootstrap: {line}")
        assert stack.server is not None
        console.print(f"  webhook:   {stack.server.webhook_url} (project {stack.project_id} hook connected)")
        specs = [
            {"name": f"job-{i + 1}", "stage": "test", "tags": TAG_PATTERN[i % len(TAG_PATTERN)]} for i in range(jobs)
        ]
        pipeline_id = stack.gitlab.create_pipeline(stack.project_id, specs)
        console.print(f"created pipeline {pipeline_id} with {jobs} jobs")
        stack.gitlab.wait_for_deliveries(timeout=30)
        pipeline_jobs = requests.get(
            f"{stack.gitlab.url}/api/v4/projects/{stack.project_id}/pipelines/{pipeline_id}/jobs",
            headers={"PRIVATE-TOKEN": GITLAB_ADMIN_TOKEN},
            params={"per_page": 100},
            timeout=10,
        ).json()
        cancelled = pipeline_jobs[-1]
        stack.gitlab.set_job_status(stack.project_id, cancelled["id"], "canceled")
        stack.gitlab.wait_for_deliveries(timeout=30)

        from chalicelib import runtime
        from chalicelib.store import job_key

        store = runtime.store()
        records = {j["id"]: store.get(job_key(stack.project_id, j["id"])) for j in pipeline_jobs}
        queued = _queued_messages(stack)
        queued_per_job = Counter(m["job_id"] for m in queued)
        answers = Counter(d.status_code for d in stack.gitlab.deliveries)

        table = Table("job", "name", "tags", "GitLab", "recorded", "queued")
        for job in pipeline_jobs:
            record = records[job["id"]] or {}
            table.add_row(
                str(job["id"]),
                job["name"],
                ",".join(job["tag_list"]) or "(untagged)",
                stack.gitlab.job(stack.project_id, job["id"])["status"],
                str(record.get("status", "-")),
                str(queued_per_job.get(job["id"], 0)),
            )
        console.print(table)

        expectations = {
            "every webhook answered 200": set(answers) == {200},
            "every job recorded": all(records.values()),
            "every job queued exactly once": all(queued_per_job.get(j["id"]) == 1 for j in pipeline_jobs)
            and len(queued) == len(pipeline_jobs),
            "cancelled job recorded as canceled": (records[cancelled["id"]] or {}).get("status") == "canceled",
        }
        for name, met in expectations.items():
            console.print(f"  {'[green]ok[/green]' if met else '[red]FAILED[/red]'}  {name}")
        return {
            "scenario": "webhook-intake",
            "pipeline_jobs": len(pipeline_jobs),
            "webhooks_delivered": sum(answers.values()),
            "webhooks_by_status": {str(k): v for k, v in sorted(answers.items())},
            "jobs_recorded": sum(1 for r in records.values() if r),
            "jobs_queued": len(queued),
            "jobs_canceled": 1,
            "seconds": round(time.monotonic() - started, 1),
            "ok": all(expectations.values()),
        }
