"""Job history read from GitLab through python-gitlab: ``GET /projects/:id/jobs``, page by page, newest first,
until the jobs are older than the window asked for."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from fleetctl.simulate.history import HistoryError, HistoryJob, job_from

# Jobs that ran on a runner and finished: the ones worth replaying.
FINISHED = ["success", "failed", "canceled"]
_SPAN = re.compile(r"^(\d+)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str) -> float:
    """``14d``, ``36h``, ``2w``... as seconds."""
    found = _SPAN.match(text.strip())
    if not found:
        raise HistoryError(f"--since {text!r}: expected a number and a unit (s, m, h, d or w), such as 14d")
    return int(found.group(1)) * _SECONDS[found.group(2)]


def _epoch(value: Any) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def job_of(project_id: int, job: dict[str, Any]) -> HistoryJob | None:
    """A history job from GitLab's job JSON; None for a job that never started on a runner."""
    started = _epoch(job.get("started_at"))
    if started is None or job.get("duration") is None:
        return None
    values: dict[str, Any] = {
        "id": job["id"],
        "project_id": project_id,
        "pipeline_id": (job.get("pipeline") or {}).get("id", 0),
        "stage": job.get("stage") or "",
        "name": job.get("name") or "",
        "duration": job["duration"],
        "tags": list(job.get("tag_list") or []),
        "status": job.get("status") or "",
        "started_at": started,
        "created_at": _epoch(job.get("created_at")),
    }
    if job.get("queued_duration") is not None:
        values["queued_duration"] = job["queued_duration"]
    else:
        values["pending_at"] = values["created_at"] or started
    return job_from(values)


def read_projects(
    gl: Any, projects: Iterable[str], since_seconds: float, *, now: float | None = None, per_page: int = 100
) -> list[HistoryJob]:
    """Finished jobs created in the last ``since_seconds`` of each project (an id or a path)."""
    cutoff = (now if now is not None else time.time()) - since_seconds
    jobs: list[HistoryJob] = []
    for project_ref in projects:
        project = gl.projects.get(project_ref, lazy=True)
        jobs += _project_jobs(project, cutoff, per_page)
    return sorted(jobs, key=lambda job: (job.pending_at, job.project_id, job.id))


def _project_jobs(project: Any, cutoff: float, per_page: int) -> Iterator[HistoryJob]:
    project_id = int(project.id) if str(project.id).isdigit() else 0
    # GitLab lists a project's jobs newest first: once past the window, every later page is older still.
    for listed in project.jobs.list(scope=FINISHED, per_page=per_page, iterator=True):
        data = listed.asdict()
        created = _epoch(data.get("created_at"))
        if created is not None and created < cutoff:
            return
        job = job_of(project_id or int(data.get("project_id", 0) or 0), data)
        if job is not None:
            yield job
