"""Typed GitLab webhook payloads.

A Job Hook is parsed once at the edge into ``JobHook``; nothing past the webhook reads the raw dict. GitLab has
sent two timestamp formats over the years (``2019-11-21 13:34:18 UTC`` and ISO 8601 with ``*_iso`` twins), and
adds fields between releases, so unknown fields are ignored while the fields runner-fleet relies on are strict:
a build id given as a string or a boolean is a malformed hook, not something to coerce.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from chalicelib.errors import PayloadError

_LEGACY_FORMAT = "%Y-%m-%d %H:%M:%S %Z"


class JobStatus(str, Enum):
    """GitLab job statuses (doc/api/jobs.md)."""

    CREATED = "created"
    WAITING_FOR_RESOURCE = "waiting_for_resource"
    PREPARING = "preparing"
    PENDING = "pending"
    RUNNING = "running"
    CANCELING = "canceling"
    WAITING_FOR_CALLBACK = "waiting_for_callback"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELED = "canceled"
    SKIPPED = "skipped"
    MANUAL = "manual"
    SCHEDULED = "scheduled"

    @property
    def rank(self) -> int:
        """Position in a job's life; webhooks arrive unordered, so a lower rank never overwrites a higher one."""
        return _RANKS[self]

    @property
    def finished(self) -> bool:
        return self.rank == FINISHED_RANK


FINISHED_RANK = 5
_RANKS = {
    JobStatus.CREATED: 1,
    JobStatus.MANUAL: 1,
    JobStatus.SCHEDULED: 1,
    JobStatus.WAITING_FOR_RESOURCE: 1,
    JobStatus.PREPARING: 1,
    JobStatus.PENDING: 2,
    JobStatus.RUNNING: 3,
    JobStatus.CANCELING: 4,
    JobStatus.WAITING_FOR_CALLBACK: 4,
    JobStatus.SUCCESS: FINISHED_RANK,
    JobStatus.FAILED: FINISHED_RANK,
    JobStatus.CANCELED: FINISHED_RANK,
    JobStatus.SKIPPED: FINISHED_RANK,
}


def parse_gitlab_time(value: Any) -> datetime | None:
    """Accept both GitLab timestamp formats; anything else is a malformed hook."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("must be a timestamp string")
    text = value.strip()
    try:
        if text.endswith(" UTC"):
            return datetime.strptime(text, _LEGACY_FORMAT).replace(tzinfo=UTC)
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"unrecognised timestamp {text[:40]!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


GitLabTime = Annotated[datetime | None, BeforeValidator(parse_gitlab_time)]
Id = Annotated[int, Field(strict=True, gt=0)]
Text = Annotated[str, Field(strict=True)]


class HookRunner(BaseModel):
    """The runner that took the job (null while the job is created or pending)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: Id
    description: str | None = None
    tags: tuple[str, ...] = ()
    runner_type: str | None = None


class JobHook(BaseModel):
    """``X-Gitlab-Event: Job Hook`` body. It carries no job tags: scale-up reads ``tag_list`` from the API."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    object_kind: Literal["build"] = "build"
    build_id: Id
    project_id: Id
    build_status: Text
    pipeline_id: Id | None = None
    build_name: str = ""
    build_stage: str = ""
    ref: str = ""
    project_name: str = ""
    build_created_at: GitLabTime = None
    build_started_at: GitLabTime = None
    build_finished_at: GitLabTime = None
    build_failure_reason: str | None = None
    retries_count: int = 0
    runner: HookRunner | None = None

    @property
    def status(self) -> JobStatus | None:
        """The status as a known enum member, or None for a status this release does not know."""
        try:
            return JobStatus(self.build_status)
        except ValueError:
            return None


def parse_job_hook(document: object) -> JobHook:
    """Validate a decoded Job Hook body, naming every bad field in the error."""
    if not isinstance(document, dict):
        raise PayloadError("body must be a JSON object")
    try:
        return JobHook.model_validate(document)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in err["loc"]) or "body" for err in exc.errors()})
        raise PayloadError("invalid Job Hook: " + ", ".join(fields)) from None
