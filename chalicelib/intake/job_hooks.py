"""Typed GitLab webhook payloads.

A Job Hook is decoded once at the edge into ``JobHook``; nothing past the webhook reads the raw dict. GitLab has
sent two timestamp formats over the years (``2019-11-21 13:34:18 UTC`` and ISO 8601 with ``*_iso`` twins), and
adds fields between releases, so unknown fields are ignored while the fields runner-fleet relies on are strict:
a build id given as a string or a boolean is a malformed hook, not something to coerce.

Every value the webhook keeps is bounded here, at the edge, so that nothing behind it (DynamoDB's 38-digit
numbers and 400 KB items, SQS's 256 KB messages, GitLab's signed 64-bit ids) ever sees a value it cannot take
and turns a hostile body into a 5xx: ids are positive and fit a signed 64-bit integer, counts are bounded, and
every string has a maximum length (``MAX_*`` below; GitLab itself limits job and stage names to 255
characters). A body nested deeper than the decoder's recursion limit is a malformed hook too.

The model is a msgspec Struct rather than a pydantic model because it sits on the webhook's cold path: msgspec
imports in a few milliseconds and decodes and validates the request bytes in one pass, where pydantic's import
and model build would cost the webhook Lambda more than half of its cold start.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum
from typing import Annotated, Literal

import msgspec
import msgspec.json

from chalicelib.errors import PayloadError

_LEGACY_FORMAT = "%Y-%m-%d %H:%M:%S %Z"

MAX_ID = 2**63 - 1  # GitLab ids are PostgreSQL bigint
MAX_COUNT = 1_000_000
MAX_STATUS_LENGTH = 64
MAX_NAME_LENGTH = 255  # job, stage and failure reason; GitLab refuses longer job and stage names
MAX_TEXT_LENGTH = 1024  # ref, project name, runner description
MAX_TIMESTAMP_LENGTH = 64
MAX_RUNNER_TAGS = 256
MAX_QUEUED_SECONDS = 10 * 365 * 24 * 3600.0
_MAX_ERROR_LENGTH = 200


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


def parse_gitlab_time(value: object) -> datetime | None:
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
        # An offset can push year 1 or 9999 out of datetime's range once it is converted to UTC.
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise ValueError(f"unrecognised timestamp {text[:40]!r}") from None


Id = Annotated[int, msgspec.Meta(gt=0, le=MAX_ID)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
Status = Annotated[str, msgspec.Meta(max_length=MAX_STATUS_LENGTH)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_LENGTH)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_LENGTH)]
Timestamp = Annotated[str, msgspec.Meta(max_length=MAX_TIMESTAMP_LENGTH)]


class HookRunner(msgspec.Struct, frozen=True):
    """The runner that took the job (null while the job is created or pending)."""

    id: Id
    description: Text | None = None
    tags: Annotated[tuple[Name, ...], msgspec.Meta(max_length=MAX_RUNNER_TAGS)] = ()
    runner_type: Status | None = None


class JobHook(msgspec.Struct, frozen=True):
    """``X-Gitlab-Event: Job Hook`` body. It carries no job tags: scale-up reads ``tag_list`` from the API."""

    build_id: Id
    project_id: Id
    build_status: Status
    object_kind: Literal["build"] = "build"
    pipeline_id: Id | None = None
    build_name: Name = ""
    build_stage: Name = ""
    ref: Text = ""
    project_name: Text = ""
    build_created_at: Timestamp | None = None
    build_started_at: Timestamp | None = None
    build_finished_at: Timestamp | None = None
    build_failure_reason: Name | None = None
    # Seconds the job waited in GitLab's queue before a runner took it (null before that).
    build_queued_duration: Annotated[float, msgspec.Meta(ge=0, le=MAX_QUEUED_SECONDS)] | None = None
    retries_count: Count = 0
    runner: HookRunner | None = None

    def __post_init__(self) -> None:
        # msgspec reports a ValueError raised here as a validation error of the document.
        for name in ("build_created_at", "build_started_at", "build_finished_at"):
            try:
                parse_gitlab_time(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{exc} - at `$.{name}`") from None

    @property
    def status(self) -> JobStatus | None:
        """The status as a known enum member, or None for a status this release does not know."""
        try:
            return JobStatus(self.build_status)
        except ValueError:
            return None

    @property
    def created_at(self) -> datetime | None:
        return parse_gitlab_time(self.build_created_at)

    @property
    def started_at(self) -> datetime | None:
        return parse_gitlab_time(self.build_started_at)


_decoder = msgspec.json.Decoder(JobHook)


def parse_job_hook(body: bytes) -> JobHook:
    """Decode and validate a Job Hook body, naming the bad field in the error."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise PayloadError(f"invalid Job Hook: {_short(str(exc))}") from None
    except msgspec.DecodeError:
        raise PayloadError("body is not JSON") from None
    except UnicodeDecodeError:
        raise PayloadError("body is not UTF-8") from None
    except RecursionError:
        # msgspec descends into unknown fields too; a legitimate hook nests three levels deep.
        raise PayloadError("body is nested too deeply") from None


def _short(message: str) -> str:
    """msgspec quotes the bad value (an unknown ``object_kind``, say): keep the answer small, and the field."""
    if len(message) <= _MAX_ERROR_LENGTH:
        return message
    problem, at, path = message.rpartition(" - at ")
    if not at:
        return message[:_MAX_ERROR_LENGTH] + "..."
    return problem[: _MAX_ERROR_LENGTH // 2] + "..." + at + path[: _MAX_ERROR_LENGTH // 2]
