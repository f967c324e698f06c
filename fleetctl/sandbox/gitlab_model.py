"""State of the GitLab emulator: projects, hooks, pipelines, jobs, runners and the webhook delivery log.

This is the model half of the emulator (moto's ``models.py``); parsing HTTP and routing live in
``gitlab_emulator.py``. It keeps the slice of GitLab that runner-fleet depends on (the job queue, runner
registration and matching, Job Hooks) and answers in the shapes GitLab documents. Everything is behind one
re-entrant lock. A job status change builds its Job Hook body while holding that lock, so each webhook is a
consistent snapshot of the moment the change happened, as GitLab's own Sidekiq payloads are.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------


class JobStatus(StrEnum):
    CREATED = "created"
    WAITING_FOR_RESOURCE = "waiting_for_resource"
    PREPARING = "preparing"
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELING = "canceling"
    CANCELED = "canceled"
    SKIPPED = "skipped"
    MANUAL = "manual"
    SCHEDULED = "scheduled"
    WAITING_FOR_CALLBACK = "waiting_for_callback"


# GitLab's COMPLETED_STATUSES (app/models/concerns/ci/has_status.rb): a stage whose jobs are all here is done.
FINISHED_STATUSES = frozenset({JobStatus.SUCCESS, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.SKIPPED})
# A runner may only report on a job it is still working on ("processing on runner").
RUNNER_OWNED_STATUSES = frozenset({JobStatus.RUNNING, JobStatus.CANCELING})
# The states a runner may report with PUT /jobs/:id (Ci::UpdateBuildStateService); anything else is a 400.
RUNNER_REPORTED_STATUSES = frozenset({JobStatus.RUNNING, JobStatus.SUCCESS, JobStatus.FAILED})
# Transitions after which Ci::Build executes its Job Hooks (besides creation): entering pending, pending to
# running, and finishing as success, failed or canceled. Skipping, going back to created, manual and canceling
# send nothing.
HOOKED_STATUSES = frozenset({JobStatus.PENDING, JobStatus.SUCCESS, JobStatus.FAILED, JobStatus.CANCELED})


class When(StrEnum):
    """A job's ``when:``: which outcome of the earlier stages lets it run (Ci::ProcessBuildService)."""

    ON_SUCCESS = "on_success"
    ON_FAILURE = "on_failure"
    ALWAYS = "always"


# The earlier stages' composite status that lets a job of each kind become pending; any other completed status
# skips it.
RUNS_AFTER: dict[When, frozenset[JobStatus]] = {
    When.ON_SUCCESS: frozenset({JobStatus.SUCCESS, JobStatus.SKIPPED}),
    When.ON_FAILURE: frozenset({JobStatus.FAILED}),
    When.ALWAYS: frozenset({JobStatus.SUCCESS, JobStatus.FAILED, JobStatus.SKIPPED}),
}

# The stages a pipeline has when .gitlab-ci.yml lists none; a listed ``stages:`` is wrapped in .pre and .post.
DEFAULT_STAGES = (".pre", "build", "test", "deploy", ".post")
# A job's script when its spec gives none: a second of work, so a job is seen running before it finishes.
DEFAULT_SCRIPT = ("sleep 1",)

# Enums::Ci::CommitStatus.failure_reasons: a reason a runner reports outside this list is stored as
# unknown_failure, and so is the reason of every job that did not fail. The enum maps NULL to it
# (app/models/concerns/enums/ci/commit_status.rb ``unknown_failure: nil``, read back through
# app/models/commit_status.rb ``enum failure_reason:``), so Gitlab::DataBuilder::Build's
# ``build_failure_reason: build.failure_reason`` is "unknown_failure" for a created, pending or successful job,
# never null, as the Job events example of doc/user/project/integrations/webhook_events.md shows for "created".
UNKNOWN_FAILURE = "unknown_failure"
# The reason StuckCiJobsWorker drops a job with (app/services/ci/stuck_builds/drop_running_service.rb,
# drop_pending_service.rb).
STUCK_OR_TIMEOUT_FAILURE = "stuck_or_timeout_failure"
FAILURE_REASONS = frozenset(
    {
        UNKNOWN_FAILURE,
        "script_failure",
        "api_failure",
        STUCK_OR_TIMEOUT_FAILURE,
        "runner_system_failure",
        "missing_dependency_failure",
        "runner_unsupported",
        "stale_schedule",
        "job_execution_timeout",
        "archived_failure",
        "unmet_prerequisites",
        "scheduler_failure",
        "data_integrity_failure",
        "forward_deployment_failure",
        "user_blocked",
        "project_deleted",
        "ci_quota_exceeded",
        "pipeline_loop_detected",
        "no_matching_runner",
        "trace_size_exceeded",
        "builds_disabled",
        "environment_creation_failure",
        "deployment_rejected",
        "failed_outdated_deployment_job",
        "job_execution_server_timeout",
        "stuck_pending_with_matching_runners",
        "stuck_pending_no_matching_runners",
        "no_updates_running",
        "no_updates_canceling",
        "server_timeout_running",
        "server_timeout_canceling",
        "runner_configuration_error",
        "runner_external_dependency_failure",
        "runner_interrupted",
    }
)


class RunnerType(StrEnum):
    INSTANCE = "instance_type"
    GROUP = "group_type"
    PROJECT = "project_type"


class AccessLevel(StrEnum):
    NOT_PROTECTED = "not_protected"
    REF_PROTECTED = "ref_protected"


class RunnerStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    STALE = "stale"
    NEVER_CONTACTED = "never_contacted"
    PAUSED = "paused"


# Ci::Runner's ONLINE_CONTACT_TIMEOUT and STALE_TIMEOUT: a runner last heard from 2 hours ago or more is offline;
# one created 7 days ago or more and not heard from in the last 7 days is stale.
RUNNER_OFFLINE_AFTER = timedelta(hours=2)
RUNNER_STALE_AFTER = timedelta(days=7)
# Ci::Runner::RUNNER_QUEUE_EXPIRY_TIME: a runner's queue value (the X-GitLab-Last-Update of its 204s) lives in
# Redis this long from when it was set; ensure_runner_queue_value makes a new one after that.
RUNNER_QUEUE_EXPIRY = timedelta(hours=1)
# Ci::Runner::CREATED_RUNNER_TOKEN_PREFIX: the authentication tokens of runners created with POST /user/runners.
CREATED_RUNNER_TOKEN_PREFIX = "glrt-"  # noqa: S105 - a format prefix, not a secret
# StuckCiJobsWorker's limits (app/services/ci/stuck_builds/drop_running_service.rb, drop_pending_service.rb): a
# running job not updated for an hour is dropped; a pending one after a day, or after an hour if it is stuck.
BUILD_RUNNING_OUTDATED_TIMEOUT = timedelta(hours=1)
BUILD_PENDING_OUTDATED_TIMEOUT = timedelta(days=1)
BUILD_PENDING_STUCK_TIMEOUT = timedelta(hours=1)
# Ci::Build#needs_touch?: a runner's update moves the job's updated_at only when it is more than 15 minutes old.
BUILD_TOUCH_AFTER = timedelta(minutes=15)
# The branch every project's API answer names as its default, protected from creation on, as
# Projects::ProtectDefaultBranchService protects it under the instance's default ``default_branch_protection``
# (fully protected: pushes and merges by maintainers).
DEFAULT_BRANCH = "main"
MAINTAINER_ACCESS = 40
OWNER_ACCESS = 50
# ProtectedRefAccess::ALLOWED_ACCESS_LEVELS and their humanized names (app/models/concerns/protected_ref_access.rb).
PROTECTED_REF_ACCESS_LEVELS: dict[int, str] = {
    0: "No one",
    30: "Developers + Maintainers",
    MAINTAINER_ACCESS: "Maintainers",
    60: "Instance admins",
}
# The values the runner listings' filters accept (lib/api/ci/runners.rb): anything else is a 400.
RUNNER_TYPES = tuple(t.value for t in RunnerType)
RUNNER_FILTER_STATUSES = ("active", "paused", "online", "offline", "never_contacted", "stale")
RUNNER_SCOPES = ("specific", "shared", *RUNNER_TYPES, *RUNNER_FILTER_STATUSES)

# Every boolean event flag a project hook carries, with GitLab's defaults (only push is on by default).
HOOK_EVENT_FLAGS: dict[str, bool] = {
    "push_events": True,
    "tag_push_events": False,
    "merge_requests_events": False,
    "issues_events": False,
    "confidential_issues_events": False,
    "note_events": False,
    "confidential_note_events": False,
    "job_events": False,
    "pipeline_events": False,
    "wiki_page_events": False,
    "deployment_events": False,
    "releases_events": False,
    "milestone_events": False,
    "feature_flag_events": False,
    "repository_update_events": False,
    "resource_access_token_events": False,
    "enable_ssl_verification": True,
}

JOB_HOOK = "Job Hook"
JOB_HOOKS_TRIGGER = "job_hooks"  # a hook log's ``trigger``: the hook scope the event was sent for

# WebHooks::AutoDisabling (app/models/concerns/web_hooks/auto_disabling.rb): after more than 3 consecutive failed
# executions a project hook is disabled for 1 minute, doubling with each further failure up to a day, and for good
# once it has failed 40 times in a row; a success resets it.
TEMPORARILY_DISABLED_FAILURE_THRESHOLD = 3
PERMANENTLY_DISABLED_FAILURE_THRESHOLD = 39
INITIAL_BACKOFF = timedelta(minutes=1)
MAX_BACKOFF = timedelta(days=1)
BACKOFF_GROWTH_FACTOR = 2
# WebHookLog rows the API lists (WebHooks::WebHookLogsFinder): the last 7 days.
HOOK_LOG_WINDOW = timedelta(days=7)
SIGNING_TOKEN_PREFIX = "whsec_"  # noqa: S105 - a format prefix, not a secret
SIGNING_KEY_BYTES = 32

ADMIN_USER_ID = 1
ADMIN_USERNAME = "root"
ADMIN_NAME = "Administrator"
ADMIN_EMAIL = "admin@example.com"
# The one non-administrator the emulator knows. Memberships are not modelled: this user owns every group and
# project, which is what a group- or project-runner fleet's token holder has, and no more.
OWNER_USER_ID = 2
OWNER_USERNAME = "fleet-owner"
OWNER_NAME = "Fleet Owner"
AVATAR_URL = "https://www.gravatar.com/avatar/e64c7d89f26bd1972efa854d13d7dd61?s=80&d=identicon"
# The user fields API::Entities::Member shares with a user (Entities::UserBasic).
_MEMBER_USER_FIELDS = ("id", "username", "name", "state", "locked", "avatar_url", "web_url")
COMMIT_MESSAGE = "Sandbox pipeline\n"
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------------
# Errors: the API's own error vocabulary. The HTTP layer sends ``status`` and ``body`` as they are.
# --------------------------------------------------------------------------------


class GitLabEmulatorError(Exception):
    status = 500

    def __init__(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.body = body
        self.headers = headers or {}  # sent with the error, as the runner API's Job-Status and Range are
        super().__init__(json.dumps(body))


class NotFoundError(GitLabEmulatorError):
    status = 404

    def __init__(self, what: str) -> None:
        super().__init__({"message": f"404 {what} Not Found"})


class BadRequestError(GitLabEmulatorError):
    """A missing or invalid parameter. GitLab's Grape validation answers ``{"error": "..."}``."""

    status = 400

    def __init__(self, error: str) -> None:
        super().__init__({"error": error})


class ValidationError(GitLabEmulatorError):
    """A model validation failure. GitLab's ActiveRecord errors answer ``{"message": {field: [reasons]}}``."""

    status = 400

    def __init__(self, problems: dict[str, list[str]]) -> None:
        super().__init__({"message": problems})


class RecordNotFoundError(GitLabEmulatorError):
    """A row looked up with ``find`` that does not exist: lib/api/api.rb rescues ActiveRecord::RecordNotFound."""

    status = 404

    def __init__(self) -> None:
        super().__init__({"message": "404 Not found"})


class UnprocessableError(GitLabEmulatorError):
    """A request GitLab understood but refuses to act on (``render_api_error!(message, 422)``)."""

    status = 422

    def __init__(self, message: str) -> None:
        super().__init__({"message": message})


class ForbiddenError(GitLabEmulatorError):
    status = 403

    def __init__(self, reason: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__({"message": f"403 Forbidden - {reason}" if reason else "403 Forbidden"}, headers)


class MessageError(GitLabEmulatorError):
    """An endpoint's own refusal (``render_api_error!`` or ``error!``): ``{"message": ...}`` with any status,
    unlike Grape's parameter errors."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__({"message": message}, headers)
        self.status = status


class RefusedError(GitLabEmulatorError):
    """What an endpoint refuses by calling Grape's ``bad_request!(reason)`` (``lib/api/helpers.rb``):
    ``{"message": "400 Bad request - <reason>"}``."""

    status = 400

    def __init__(self, reason: str) -> None:
        super().__init__({"message": f"400 Bad request - {reason}"})


# --------------------------------------------------------------------------------
# Inputs: typed requests the HTTP layer (or Python callers) hand to the model
# --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """One job of a pipeline. GitLab reads these from .gitlab-ci.yml; the emulator takes them directly."""

    name: str
    stage: str = "test"
    tags: Sequence[str] = ()
    allow_failure: bool = False
    when: When = When.ON_SUCCESS
    # The job's ``script:`` lines, handed to the runner in the ``/jobs/request`` answer's ``steps``.
    script: Sequence[str] = DEFAULT_SCRIPT


@dataclass(frozen=True)
class HookChanges:
    """Settings for creating or updating a project hook. ``None`` leaves a setting as it is; an empty token
    clears it."""

    url: str | None = None
    token: str | None = None
    signing_token: str | None = None
    name: str | None = None
    description: str | None = None
    flags: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class User:
    """Whom a personal access token authenticates; ``admin`` is GitLab's administrator flag."""

    id: int
    username: str
    name: str
    admin: bool


ADMIN = User(ADMIN_USER_ID, ADMIN_USERNAME, ADMIN_NAME, admin=True)
OWNER = User(OWNER_USER_ID, OWNER_USERNAME, OWNER_NAME, admin=False)

# Personal access token scopes (doc/user/profile/personal_access_tokens.md). Only the first four decide anything
# in the emulator; the others are accepted so that a token can carry them, as real tokens do.
API_SCOPE = "api"
READ_API_SCOPE = "read_api"
CREATE_RUNNER_SCOPE = "create_runner"
MANAGE_RUNNER_SCOPE = "manage_runner"
TOKEN_SCOPES = frozenset(
    {
        API_SCOPE,
        READ_API_SCOPE,
        CREATE_RUNNER_SCOPE,
        MANAGE_RUNNER_SCOPE,
        "read_user",
        "read_repository",
        "write_repository",
        "read_registry",
        "write_registry",
        "sudo",
        "admin_mode",
        "ai_features",
        "k8s_proxy",
        "read_service_ping",
        "self_rotate",
    }
)


@dataclass
class AccessToken:
    """A personal access token: whose it is, what it may do, and whether it still works."""

    id: int
    name: str
    user: User
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: date | None = None
    revoked: bool = False
    last_used_at: datetime | None = None

    def expired(self, now: datetime) -> bool:
        # PersonalAccessToken#expired?: a token expires at the start of its expiry date.
        return self.expires_at is not None and self.expires_at <= now.astimezone(UTC).date()


@dataclass(frozen=True)
class RunnerSettings:
    """``POST /user/runners`` parameters."""

    runner_type: RunnerType
    group_id: int | None = None
    project_id: int | None = None
    description: str = ""
    paused: bool = False
    locked: bool = False
    run_untagged: bool = True
    tag_list: Sequence[str] = ()
    access_level: AccessLevel = AccessLevel.NOT_PROTECTED
    maximum_timeout: int | None = None
    maintenance_note: str | None = None


@dataclass(frozen=True)
class RunnerChanges:
    """``PUT /runners/:id`` parameters; ``None`` leaves a setting as it is."""

    description: str | None = None
    paused: bool | None = None
    locked: bool | None = None
    run_untagged: bool | None = None
    tag_list: Sequence[str] | None = None
    access_level: AccessLevel | None = None
    maximum_timeout: int | None = None
    maintenance_note: str | None = None


@dataclass(frozen=True)
class RunnerFilters:
    """Filters of the runner listings (``/runners``, ``/runners/all``, ``/groups|projects/:id/runners``)."""

    runner_type: RunnerType | None = None
    status: str | None = None
    paused: bool | None = None
    tag_list: Sequence[str] = ()
    scope: str | None = None  # deprecated: a type or a status, by its old names too ("shared", "specific")


# --------------------------------------------------------------------------------
# Outputs that leave the lock: webhook work items and the delivery log
# --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookTarget:
    """What a delivery worker needs to know about a hook, copied so later edits do not race the send."""

    hook_id: int
    project_id: int
    url: str
    token: str | None
    signing_token: str | None
    enable_ssl_verification: bool


@dataclass(frozen=True)
class OutgoingEvent:
    """One execution of one hook. A resend repeats the Idempotency-Key of the execution it resends; the
    X-Gitlab-Event-UUID is that of the execution (Gitlab::WebHooks::RecursionDetection::UUID)."""

    target: HookTarget
    event: str
    event_uuid: str
    idempotency_key: str
    body: bytes
    # The ``build_status`` a Job Hook carries, for the dispatcher to hold back some executions; None for a resend.
    build_status: str | None = None


@dataclass(frozen=True)
class JobRequestAnswer:
    """What ``POST /jobs/request`` answers: the job for the runner, or none (a 204) with the runner's queue value,
    which GitLab sends in ``X-GitLab-Last-Update``."""

    job: dict[str, Any] | None
    last_update: str | None = None


@dataclass(frozen=True)
class Delivery:
    """One hook execution (a WebHookLog), as the hook's "Recent events" page and its events API list it.

    ``id`` and ``created_at`` are given when the model logs it; ``id`` is what a resend names.
    """

    hook_id: int
    url: str
    event: str
    event_uuid: str
    webhook_uuid: str
    idempotency_key: str
    status_code: int | None
    error: str | None
    sent_at: float
    duration: float
    payload: dict[str, Any]
    request_headers: dict[str, str] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: str = ""
    id: int = 0
    created_at: datetime | None = None

    @property
    def ok(self) -> bool:
        """WebHookService#response_category: a 2xx or 3xx answer is a success; 4xx, 5xx and no answer are not."""
        return self.status_code is not None and 200 <= self.status_code < 400

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "hook_id": self.hook_id,
            "url": self.url,
            "event": self.event,
            "event_uuid": self.event_uuid,
            "webhook_uuid": self.webhook_uuid,
            "idempotency_key": self.idempotency_key,
            "status_code": self.status_code,
            "error": self.error,
            "sent_at": self.sent_at,
            "duration": self.duration,
            "payload": self.payload,
        }


# --------------------------------------------------------------------------------
# Records (mutable, only touched under the lock)
# --------------------------------------------------------------------------------


@dataclass
class Namespace:
    id: int
    name: str
    path: str
    full_path: str
    kind: str  # "user" or "group"


@dataclass
class ProtectedBranch:
    """A protected branch or wildcard pattern of branches (ProtectedBranch), with its access levels."""

    id: int
    name: str
    push_access_level: int = MAINTAINER_ACCESS
    merge_access_level: int = MAINTAINER_ACCESS
    allow_force_push: bool = False


@dataclass
class Project:
    id: int
    name: str
    path: str
    namespace: Namespace
    created_at: datetime
    description: str | None = None
    protected_branches: list[ProtectedBranch] = field(default_factory=list)
    # Protected tag names or wildcard patterns (ProtectedTag).
    protected_tags: list[str] = field(default_factory=list)

    @property
    def path_with_namespace(self) -> str:
        return f"{self.namespace.full_path}/{self.path}"

    @property
    def name_with_namespace(self) -> str:
        return f"{self.namespace.name} / {self.name}"


@dataclass
class Hook:
    id: int
    project_id: int
    url: str
    created_at: datetime
    token: str | None = None
    signing_token: str | None = None
    name: str | None = None
    description: str | None = None
    flags: dict[str, bool] = field(default_factory=lambda: dict(HOOK_EVENT_FLAGS))
    # WebHooks::AutoDisabling's columns: consecutive failed executions, and the end of the current backoff.
    recent_failures: int = 0
    disabled_until: datetime | None = None


@dataclass
class RunnerManagerRecord:
    """A machine (``system_id``) using a runner's token; GitLab calls these runner managers."""

    id: int
    system_id: str
    created_at: datetime
    # None until the machine is heard from: verifying a created runner's token registers the manager without
    # contacting it.
    contacted_at: datetime | None = None


@dataclass
class Runner:
    id: int
    token: str
    runner_type: RunnerType
    description: str
    paused: bool
    locked: bool
    run_untagged: bool
    tag_list: list[str]
    access_level: AccessLevel
    maximum_timeout: int | None
    maintenance_note: str | None
    created_at: datetime
    group: Namespace | None = None
    project_ids: list[int] = field(default_factory=list)
    contacted_at: datetime | None = None
    managers: dict[str, RunnerManagerRecord] = field(default_factory=dict)
    # The runner's queue key in Redis (Ci::Runner#runner_queue_key): its value and when it was last set.
    queue_value: str | None = None
    queue_value_set_at: datetime | None = None


@dataclass
class Pipeline:
    id: int
    iid: int
    project: Project
    ref: str
    sha: str
    created_at: datetime
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    jobs: list[Job] = field(default_factory=list)
    tag: bool = False  # whether ``ref`` names a tag rather than a branch
    # Ci::Pipeline#protected_ref?, decided once when the pipeline is created.
    protected: bool = False

    @property
    def current_jobs(self) -> list[Job]:
        """The latest try of each job: a retried job stays listed (``include_retried``) but no longer counts."""
        return [j for j in self.jobs if not j.retried]


@dataclass
class Job:
    id: int
    pipeline: Pipeline
    name: str
    stage: str
    tags: list[str]
    allow_failure: bool
    created_at: datetime
    # The row's updated_at: every status change sets it, and so do the runner's updates when it is older than
    # BUILD_TOUCH_AFTER. StuckCiJobsWorker reads it.
    updated_at: datetime
    when: When = When.ON_SUCCESS
    script: tuple[str, ...] = DEFAULT_SCRIPT
    # Ci::Build#protected: whether the job's ref was protected when it was created.
    protected: bool = False
    retries_count: int = 0
    status: JobStatus = JobStatus.CREATED
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    failure_reason: str | None = None
    runner: Runner | None = None
    runner_manager: RunnerManagerRecord | None = None
    token: str | None = None
    retried: bool = False
    trace: bytearray = field(default_factory=bytearray)

    @property
    def project(self) -> Project:
        return self.pipeline.project


# --------------------------------------------------------------------------------
# Time formats
# --------------------------------------------------------------------------------


def iso_ms(at: datetime | None) -> str | None:
    """The API's timestamp format, ``2021-02-23T02:41:37.886Z``."""
    if at is None:
        return None
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def iso_s(at: datetime | None) -> str | None:
    """The webhook ``*_iso`` format, ``2021-02-23T02:41:37Z``."""
    return None if at is None else at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def legacy_time(at: datetime | None) -> str | None:
    """Older GitLab webhook format, ``2019-11-21 13:34:18 UTC``."""
    return None if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 6)


def composite_status(jobs: Iterable[Job]) -> JobStatus | None:
    """The status of a group of jobs (a stage, the stages before one, a pipeline) as GitLab derives it
    (lib/gitlab/ci/status/composite.rb), or ``None`` for no jobs. A job allowed to fail that failed or was canceled
    counts as a success with warnings; a manual job allowed to fail is ignored."""
    found: set[str] = set()
    for job in jobs:
        if job.allow_failure and job.status in {JobStatus.FAILED, JobStatus.CANCELED}:
            found.add("success_with_warnings")
        elif job.allow_failure and job.status is JobStatus.MANUAL:
            found.add("ignored")
        else:
            found.add(job.status.value)
    if not found:
        return None

    def only(*names: str) -> bool:
        return found <= set(names)

    def any_of(*names: str) -> bool:
        return bool(found & set(names))

    lenient = ("success_with_warnings", "ignored")
    ordered: list[tuple[bool, JobStatus]] = [
        (only("skipped", "ignored"), JobStatus.SKIPPED),
        (only("success", "skipped", *lenient), JobStatus.SUCCESS),
        (only("created", *lenient), JobStatus.CREATED),
        (only("preparing", *lenient), JobStatus.PREPARING),
        (only("canceled", "success", "skipped", *lenient), JobStatus.CANCELED),
        (only("pending", "created", "skipped", *lenient), JobStatus.PENDING),
        (any_of("running", "pending"), JobStatus.RUNNING),
        (any_of("waiting_for_resource"), JobStatus.WAITING_FOR_RESOURCE),
        (any_of("waiting_for_callback"), JobStatus.WAITING_FOR_CALLBACK),
        (any_of("manual"), JobStatus.MANUAL),
        (any_of("scheduled"), JobStatus.SCHEDULED),
        (any_of("preparing"), JobStatus.PREPARING),
        (any_of("created"), JobStatus.RUNNING),
        (any_of("canceling"), JobStatus.CANCELING),
    ]
    return next((status for matched, status in ordered if matched), JobStatus.FAILED)


def parse_signing_token(value: str) -> str:
    """Validate a Standard Webhooks secret: ``whsec_`` followed by base64 of a 32-byte key."""
    if not value.startswith(SIGNING_TOKEN_PREFIX):
        raise BadRequestError("signing_token is invalid")
    try:
        key = base64.b64decode(value.removeprefix(SIGNING_TOKEN_PREFIX), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError("signing_token is invalid") from exc
    if len(key) != SIGNING_KEY_BYTES:
        raise BadRequestError("signing_token is invalid")
    return value


# ``Ci::Runner`` limits (app/models/ci/runner.rb).
RUNNER_MIN_TIMEOUT = 600
RUNNER_MAX_TAGS = 50
RUNNER_TEXT_MAX = 1024


def runner_validation_errors(settings: RunnerSettings) -> list[str]:
    """The full messages of ``Ci::Runner``'s validations a new runner fails, in the model's declaration order."""
    problems: list[str] = []
    if not settings.tag_list and not settings.run_untagged:
        problems.append("Tags list can not be empty when runner is not allowed to pick untagged jobs")
    if len(settings.tag_list) > RUNNER_MAX_TAGS:
        problems.append(f"Tags list Too many tags specified. Please limit the number of tags to {RUNNER_MAX_TAGS}")
    if len(settings.description) > RUNNER_TEXT_MAX:
        problems.append(f"Description is too long (maximum is {RUNNER_TEXT_MAX} characters)")
    if settings.maximum_timeout is not None and settings.maximum_timeout < RUNNER_MIN_TIMEOUT:
        problems.append("Maximum timeout needs to be at least 10 minutes")
    if settings.maintenance_note is not None and len(settings.maintenance_note) > RUNNER_TEXT_MAX:
        problems.append(f"Maintenance note is too long (maximum is {RUNNER_TEXT_MAX} characters)")
    return problems


def ref_matches(pattern: str, ref: str) -> bool:
    """Gitlab::RefMatcher#matches? (lib/gitlab/ref_matcher.rb): the exact name, or a pattern whose ``*`` matches
    any run of characters, slashes included, anchored at both ends."""
    if not pattern:
        return False
    if pattern == ref:
        return True
    if "*" not in pattern:
        return False
    regex = ".*?".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, ref) is not None


def to_sentence(parts: Sequence[str]) -> str:
    """Rails' ``Array#to_sentence``: "a", "a and b", "a, b, and c"."""
    if len(parts) <= 2:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + ", and " + parts[-1]


# --------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------


class RequestHold:
    """One held ``POST /jobs/request``: ``reached`` is set once the request passed the active check and waits;
    ``release()`` lets it go on to the assignment. A hold nobody releases lets go after ``timeout`` seconds."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.reached = threading.Event()
        self._released = threading.Event()
        self._timeout = timeout

    def wait(self) -> None:
        self.reached.set()
        self._released.wait(self._timeout)

    def release(self) -> None:
        self._released.set()


class GitLabModel:
    """All emulator state. Public methods take the lock and return API-shaped dicts, fresh copies."""

    def __init__(
        self,
        *,
        legacy_timestamps: bool = False,
        clock: Clock = utcnow,
        on_event: Callable[[OutgoingEvent], None] | None = None,
        auto_disabling: bool = True,
    ) -> None:
        self.lock = threading.RLock()
        self.external_url = "http://gitlab.sandbox"
        self._legacy_timestamps = legacy_timestamps
        # The ``auto_disabling_web_hooks`` ops flag: on at GitLab.com, off by default on self-managed instances.
        self._auto_disabling = auto_disabling
        self._clock = clock
        self._on_event = on_event or (lambda _event: None)
        self._namespaces: dict[str, Namespace] = {}
        self._projects: dict[int, Project] = {}
        self._hooks: dict[int, Hook] = {}
        self._pipelines: dict[int, Pipeline] = {}
        self._jobs: dict[int, Job] = {}
        # Jobs waiting for a runner, in the order they were queued: dict order is the queue.
        self._queue: dict[int, Job] = {}
        self._runners: dict[int, Runner] = {}
        self._tokens: dict[str, AccessToken] = {}
        # Job requests held between the active check and the assignment, by runner id (see ``hold_job_request``).
        self._held_requests: dict[int, RequestHold] = {}
        # Instance feature flags an administrator enabled (``Feature.enable(:name)``).
        self.features: set[str] = set()
        # Whether hooks honour ``signing_token``; the HTTP layer decides it from the version and the flags.
        self.signing_honoured: Callable[[], bool] = lambda: False
        # Whether hook answers carry ``token_present`` and ``signing_token_present`` (GitLab 19.0 and later).
        self.hook_token_fields = False
        self._deliveries: list[Delivery] = []
        self._next_log_id = 1
        # Id sequences start far apart, so a project id passed where a job or runner id belongs gets a 404
        # instead of quietly hitting another object.
        self._next_id = {
            "namespace": 1,
            "project": 1,
            "hook": 1,
            "pipeline": 1_000,
            "job": 100_000,
            "runner": 10_000_000,
            "token": 1,
            "protected_branch": 1,
        }
        self._next_manager_id = 1
        self._admin_namespace = self._namespace(ADMIN_USERNAME, kind="user")

    def set_event_sink(self, on_event: Callable[[OutgoingEvent], None]) -> None:
        with self.lock:
            self._on_event = on_event

    # -- users, their tokens, and the instance --

    def add_access_token(
        self,
        token: str,
        *,
        admin: bool,
        scopes: Iterable[str] = (API_SCOPE,),
        expires_at: date | None = None,
        name: str = "fleet",
    ) -> None:
        """A personal access token of the administrator (``admin``) or of the owner of every group and project."""
        chosen = tuple(dict.fromkeys(scopes))
        unknown = sorted(set(chosen) - TOKEN_SCOPES)
        if not chosen or unknown:
            raise ValueError(f"a personal access token needs known scopes, got {list(chosen)}")
        with self.lock:
            self._tokens[token] = AccessToken(
                id=self._take_id("token"),
                name=name,
                user=ADMIN if admin else OWNER,
                scopes=chosen,
                created_at=self._clock(),
                expires_at=expires_at,
            )

    def revoke_access_token(self, token: str) -> None:
        """GitLab keeps a revoked token, so that using it is answered "revoked" rather than "unknown"."""
        with self.lock:
            found = self._tokens.get(token)
            if found is not None:
                found.revoked = True

    def access_token(self, token: str) -> AccessToken | None:
        with self.lock:
            for known, found in self._tokens.items():
                if hmac.compare_digest(known.encode(), token.encode()):
                    return found
            return None

    def use_access_token(self, found: AccessToken) -> None:
        with self.lock:
            found.last_used_at = self._clock()

    def now(self) -> datetime:
        return self._clock()

    def personal_access_token_json(self, found: AccessToken) -> dict[str, Any]:
        """``GET /personal_access_tokens/self``: ``Entities::PersonalAccessToken``, never the token itself."""
        with self.lock:
            return {
                "id": found.id,
                "name": found.name,
                "revoked": found.revoked,
                "created_at": iso_ms(found.created_at),
                "description": None,
                "scopes": list(found.scopes),
                "user_id": found.user.id,
                "last_used_at": iso_ms(found.last_used_at),
                "active": not found.revoked and not found.expired(self._clock()),
                "expires_at": None if found.expires_at is None else found.expires_at.isoformat(),
            }

    def current_user(self, user: User = ADMIN) -> dict[str, Any]:
        with self.lock:
            return {
                **self._user_json(user),
                "email": ADMIN_EMAIL if user.admin else f"{user.username}@example.com",
                "is_admin": user.admin,
                "can_create_project": True,
                "can_create_group": True,
            }

    # -- projects --

    def create_group(self, full_path: str) -> int:
        """The group at ``full_path`` (made if new); its id."""
        with self.lock:
            return self._namespace(full_path, kind="group").id

    def create_project(
        self,
        *,
        name: str | None = None,
        path: str | None = None,
        namespace_id: int | None = None,
        namespace_path: str | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            if not name and not path:
                raise BadRequestError("name, path are missing, at least one parameter must be provided")
            path = path or (name or "").strip().lower().replace(" ", "-")
            name = name or path
            if namespace_path is not None:
                namespace = self._namespace(namespace_path, kind="group")
            elif namespace_id is not None:
                namespace = self._namespace_by_id(namespace_id)
            else:
                namespace = self._admin_namespace
            if any(p.namespace is namespace and p.path == path for p in self._projects.values()):
                taken = ["has already been taken"]
                raise ValidationError({"path": taken, "name": taken})
            project = Project(
                id=self._take_id("project"),
                name=name,
                path=path,
                namespace=namespace,
                created_at=self._clock(),
                description=description,
                protected_branches=[ProtectedBranch(id=self._take_id("protected_branch"), name=DEFAULT_BRANCH)],
            )
            self._projects[project.id] = project
            return self._project_json(project)

    def get_project(self, ref: str | int) -> dict[str, Any]:
        with self.lock:
            return self._project_json(self._project(ref))

    def list_projects(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self._project_json(p) for p in sorted(self._projects.values(), key=lambda p: -p.id)]

    # -- members --

    def member(self, kind: str, ref: str | int, user_id: int) -> dict[str, Any]:
        """``GET /groups/:id/members/all/:user_id`` or ``/projects/:id/members/all/:user_id`` (``kind`` "group" or
        "project"): the user's membership, inherited ones included, as ``Entities::Member``; 404 for a user who is
        no member. Memberships are not modelled beyond what the module says: the one non-administrator owns every
        group and, through it, every project; the administrator owns only the projects of its own namespace."""
        with self.lock:
            namespace = self._group(ref) if kind == "group" else self._project(ref).namespace
            user = OWNER if user_id == OWNER.id else ADMIN if user_id == ADMIN.id else None
            if user is None or (user.admin and namespace is not self._admin_namespace):
                raise NotFoundError("Member")
            if not user.admin and namespace.kind != "group":
                raise NotFoundError("Member")
            return {
                **{key: value for key, value in self._user_json(user).items() if key in _MEMBER_USER_FIELDS},
                "access_level": OWNER_ACCESS,
                "created_at": iso_ms(EPOCH),
                "created_by": None,
                "expires_at": None,
                "group_saml_identity": None,
                "membership_state": "active",
            }

    # -- protected refs --

    def protect_branch(
        self,
        project_ref: str | int,
        name: str,
        *,
        push_access_level: int = MAINTAINER_ACCESS,
        merge_access_level: int = MAINTAINER_ACCESS,
        allow_force_push: bool = False,
    ) -> dict[str, Any]:
        """``POST /projects/:id/protected_branches`` (lib/api/protected_branches.rb): protect a branch or a wildcard
        pattern of branches; one already protected under that name is a 409. Pipelines created from now on for a
        matching branch are protected; existing jobs keep the flag they were created with."""
        with self.lock:
            # Grape's ``values:`` validation runs before the endpoint looks for an existing protection.
            for key, level in (("push_access_level", push_access_level), ("merge_access_level", merge_access_level)):
                if level not in PROTECTED_REF_ACCESS_LEVELS:
                    raise BadRequestError(f"{key} does not have a valid value")
            project = self._project(project_ref)
            if any(b.name == name for b in project.protected_branches):
                raise MessageError(409, f"Protected branch '{name}' already exists")
            branch = ProtectedBranch(
                id=self._take_id("protected_branch"),
                name=name,
                push_access_level=push_access_level,
                merge_access_level=merge_access_level,
                allow_force_push=allow_force_push,
            )
            project.protected_branches.append(branch)
            return self._protected_branch_json(branch)

    def list_protected_branches(self, project_ref: str | int) -> list[dict[str, Any]]:
        with self.lock:
            return [self._protected_branch_json(b) for b in self._project(project_ref).protected_branches]

    def protect_tag(self, project_ref: str | int, name: str) -> None:
        """A protected tag name or wildcard pattern (ProtectedTag): pipelines for a matching tag are protected."""
        with self.lock:
            project = self._project(project_ref)
            if name not in project.protected_tags:
                project.protected_tags.append(name)

    # -- hooks --

    def list_hooks(self, project_ref: str | int) -> list[dict[str, Any]]:
        with self.lock:
            project = self._project(project_ref)
            return [self._hook_json(h) for h in self._hooks.values() if h.project_id == project.id]

    def create_hook(self, project_ref: str | int, changes: HookChanges) -> dict[str, Any]:
        with self.lock:
            project = self._project(project_ref)
            if not changes.url:
                raise BadRequestError("url is missing")
            hook = Hook(
                id=self._take_id("hook"),
                project_id=project.id,
                url=changes.url,
                created_at=self._clock(),
            )
            self._apply_hook_changes(hook, changes)
            self._hooks[hook.id] = hook
            return self._hook_json(hook)

    def get_hook(self, project_ref: str | int, hook_id: int) -> dict[str, Any]:
        with self.lock:
            return self._hook_json(self._hook(project_ref, hook_id))

    def update_hook(self, project_ref: str | int, hook_id: int, changes: HookChanges) -> dict[str, Any]:
        with self.lock:
            hook = self._hook(project_ref, hook_id)
            self._apply_hook_changes(hook, changes)
            return self._hook_json(hook)

    def delete_hook(self, project_ref: str | int, hook_id: int) -> None:
        with self.lock:
            del self._hooks[self._hook(project_ref, hook_id).id]

    def hook_project(self, hook_id: int) -> int:
        """The id of the project a hook belongs to."""
        with self.lock:
            hook = self._hooks.get(hook_id)
            if hook is None:
                raise NotFoundError("Hook")
            return hook.project_id

    def hook_executable(self, hook_id: int) -> bool:
        """Whether an execution of the hook may be sent now: WebHookWorker finds the hook (gone: nothing is sent)
        and WebHookService#execute refuses a disabled one."""
        with self.lock:
            hook = self._hooks.get(hook_id)
            return hook is not None and self._executable(hook, self._clock())

    def list_hook_logs(
        self, project_ref: str | int, hook_id: int, statuses: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """``GET /projects/:id/hooks/:hook_id/events``: the hook's executions of the last 7 days, newest first,
        optionally only those whose status is one of ``statuses`` (a code, or ``successful``, ``client_failure``,
        ``server_failure``)."""
        with self.lock:
            hook = self._hook(project_ref, hook_id)
            since = self._clock() - HOOK_LOG_WINDOW
            logs = [
                d
                for d in reversed(self._deliveries)
                if d.hook_id == hook.id and d.created_at is not None and d.created_at >= since
            ]
            return [self._hook_log_json(d) for d in logs if not statuses or _status_matches(d, statuses)]

    def resend_execution(
        self, project_ref: str | int, hook_id: int, log_id: int, event_uuid: str | None = None
    ) -> OutgoingEvent:
        """What ``POST .../hooks/:hook_id/events/:hook_log_id/resend`` sends (WebHooks::Events::ResendService):
        the logged payload and Idempotency-Key, to the hook as it is now. Refused (422) when the hook's URL changed
        since, or the hook is disabled; the X-Gitlab-Event-UUID is the resend request's own, or a new one."""
        with self.lock:
            hook = self._hook(project_ref, hook_id)
            log = next((d for d in self._deliveries if d.id == log_id and d.hook_id == hook.id), None)
            if log is None:
                raise RecordNotFoundError()
            if log.url != hook.url:
                raise UnprocessableError("The hook URL has changed, and this log entry cannot be retried")
            if not self._executable(hook, self._clock()):
                raise UnprocessableError("Hook disabled")
            body = json.dumps(log.payload).encode()
            return OutgoingEvent(
                self._hook_target(hook), log.event, event_uuid or str(uuid.uuid4()), log.idempotency_key, body
            )

    # -- pipelines --

    def create_pipeline(
        self,
        project_ref: str | int,
        ref: str,
        jobs: Sequence[JobSpec],
        stages: Sequence[str] | None = None,
        *,
        tag: bool = False,
    ) -> dict[str, Any]:
        """A pipeline of ``jobs`` in ``stages`` order (GitLab's default stages when ``None``) for the branch, or with
        ``tag`` the tag, ``ref``. Every job is created, then the pipeline is processed: the first stage with jobs
        becomes pending, later stages stay created.

        Each job is created protected when the ref is: Gitlab::Ci::Pipeline::Seed::Build gives every build
        ``protected: @pipeline.protected_ref?``, which is Project#protected_for?(ref) (app/models/project.rb): a
        branch matching a protected branch (the default branch is one from the project's creation), or a tag
        matching a protected tag."""
        with self.lock:
            project = self._project(project_ref)
            if not jobs:
                # What GitLab says when .gitlab-ci.yml yields no jobs for the ref.
                raise BadRequestError("No stages / jobs for this pipeline.")
            order = list(DEFAULT_STAGES) if stages is None else [".pre", *stages, ".post"]
            for spec in jobs:
                if spec.stage not in order:
                    # The YAML processor's error, answered on the pipeline's base like any validation failure.
                    available = ", ".join(order)
                    problem = f"{spec.name} job: chosen stage does not exist; available stages are {available}"
                    raise ValidationError({"base": [problem]})
            pipeline_id = self._take_id("pipeline")
            pipeline = Pipeline(
                id=pipeline_id,
                iid=1 + sum(1 for p in self._pipelines.values() if p.project is project),
                project=project,
                ref=ref,
                sha=hashlib.sha1(f"{project.id}:{pipeline_id}".encode(), usedforsecurity=False).hexdigest(),
                created_at=self._clock(),
                stages=order,
                tag=tag,
                protected=self._protected_for(project, ref, tag=tag),
            )
            self._pipelines[pipeline.id] = pipeline
            # GitLab creates every job first (a Job Hook each), then its processing service queues what may run.
            for spec in jobs:
                self._new_job(
                    pipeline,
                    spec.name,
                    spec.stage,
                    spec.tags,
                    spec.allow_failure,
                    spec.when,
                    tuple(spec.script),
                    protected=pipeline.protected,
                )
            self._process(pipeline)
            return self._pipeline_json(pipeline, detailed=True)

    def get_pipeline(self, project_ref: str | int, pipeline_id: int) -> dict[str, Any]:
        with self.lock:
            return self._pipeline_json(self._pipeline(project_ref, pipeline_id), detailed=True)

    def list_pipelines(self, project_ref: str | int) -> list[dict[str, Any]]:
        with self.lock:
            project = self._project(project_ref)
            mine = [p for p in self._pipelines.values() if p.project is project]
            return [self._pipeline_json(p, detailed=False) for p in sorted(mine, key=lambda p: -p.id)]

    def list_pipeline_jobs(
        self, project_ref: str | int, pipeline_id: int, scopes: Sequence[JobStatus], *, include_retried: bool
    ) -> list[dict[str, Any]]:
        with self.lock:
            pipeline = self._pipeline(project_ref, pipeline_id)
            jobs = [j for j in pipeline.jobs if include_retried or not j.retried]
            return [self._job_json(j) for j in jobs if not scopes or j.status in scopes]

    # -- jobs --

    def list_jobs(self, project_ref: str | int, scopes: Sequence[JobStatus]) -> list[dict[str, Any]]:
        with self.lock:
            project = self._project(project_ref)
            # GitLab lists a project's jobs newest first.
            jobs = [j for j in reversed(self._jobs.values()) if j.project is project]
            return [self._job_json(j) for j in jobs if not scopes or j.status in scopes]

    def get_job(self, project_ref: str | int, job_id: int) -> dict[str, Any]:
        with self.lock:
            return self._job_json(self._job(project_ref, job_id))

    def job_trace(self, project_ref: str | int, job_id: int) -> bytes:
        with self.lock:
            return bytes(self._job(project_ref, job_id).trace)

    def retry_job(self, project_ref: str | int, job_id: int) -> dict[str, Any]:
        with self.lock:
            old = self._job(project_ref, job_id)
            if old.status not in FINISHED_STATUSES or old.retried:
                raise ForbiddenError("Job is not retryable")
            old.retried = True
            # Ci::Build.clone_accessors carry ``protected`` over: the new try keeps the old one's flag.
            new = self._new_job(
                old.pipeline,
                old.name,
                old.stage,
                old.tags,
                old.allow_failure,
                old.when,
                old.script,
                protected=old.protected,
            )
            new.retries_count = old.retries_count + 1
            # Ci::ResetSkippedJobsService: jobs of later stages skipped because of the old try wait again.
            later = old.pipeline.stages.index(old.stage)
            for job in old.pipeline.current_jobs:
                if job.status is JobStatus.SKIPPED and old.pipeline.stages.index(job.stage) > later:
                    self._transition(job, JobStatus.CREATED)
            self._process(old.pipeline)
            return self._job_json(new)

    def cancel_job(self, project_ref: str | int, job_id: int) -> dict[str, Any]:
        with self.lock:
            job = self._job(project_ref, job_id)
            if job.status not in FINISHED_STATUSES:
                self._transition(job, JobStatus.CANCELED)
                self._process(job.pipeline)
            return self._job_json(job)

    def set_job_status(
        self,
        project_ref: str | int,
        job_id: int,
        status: JobStatus,
        *,
        failure_reason: str | None = None,
        runner_id: int | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            job = self._job(project_ref, job_id)
            if runner_id is not None:
                job.runner = self._runner(runner_id)
            self._transition(job, status, failure_reason=failure_reason)
            self._process(job.pipeline)
            return self._job_json(job)

    def drop_stuck_jobs(self) -> list[int]:
        """One pass of StuckCiJobsWorker (app/workers/stuck_ci_jobs_worker.rb) at the model's clock; the ids of
        the jobs it dropped, each failed with ``stuck_or_timeout_failure`` and its Job Hook sent, as ``drop!``
        does.

        Ci::StuckBuilds::DropRunningService drops running jobs created and last updated more than
        BUILD_RUNNING_OUTDATED_TIMEOUT ago. Ci::StuckBuilds::DropPendingService drops pending jobs created and last
        updated more than BUILD_PENDING_OUTDATED_TIMEOUT ago, then those past BUILD_PENDING_STUCK_TIMEOUT that are
        ``stuck?``. Each goes oldest first (``order(created_at: :asc, project_id: :asc)``), and the stuck pass ends
        at the first job that is not stuck (``break unless build.stuck?``, app/services/ci/stuck_builds/
        drop_helpers.rb), leaving the stuck ones behind it for the next pass."""
        with self.lock:
            now = self._clock()
            dropped: list[int] = []

            def outdated(status: JobStatus, timeout: timedelta) -> list[Job]:
                deadline = now - timeout
                found = [
                    j
                    for j in self._jobs.values()
                    if j.status is status and j.created_at < deadline and j.updated_at < deadline
                ]
                return sorted(found, key=lambda j: (j.created_at, j.project.id, j.id))

            def drop(job: Job) -> None:
                self._transition(job, JobStatus.FAILED, failure_reason=STUCK_OR_TIMEOUT_FAILURE)
                self._process(job.pipeline)
                dropped.append(job.id)

            for job in outdated(JobStatus.RUNNING, BUILD_RUNNING_OUTDATED_TIMEOUT):
                drop(job)
            for job in outdated(JobStatus.PENDING, BUILD_PENDING_OUTDATED_TIMEOUT):
                drop(job)
            for job in outdated(JobStatus.PENDING, BUILD_PENDING_STUCK_TIMEOUT):
                if job.status is not JobStatus.PENDING:
                    continue
                if not self._stuck(job, now):
                    break
                drop(job)
            return dropped

    # -- runners (admin API) --

    def create_runner(self, settings: RunnerSettings, user: User = ADMIN) -> dict[str, Any]:
        """``POST /user/runners`` as ``lib/api/user_runners.rb`` and ``Ci::Runners::CreateRunnerService`` answer it:
        a missing ``group_id``/``project_id`` is Grape's 400, an unknown group or project the strategy's 400
        ("Missing/invalid group"), no right to create one a 403, and the ``Ci::Runner`` validations a 400 listing
        every failed rule in one sentence."""
        with self.lock:
            group: Namespace | None = None
            project_ids: list[int] = []
            if settings.runner_type is RunnerType.GROUP:
                if settings.group_id is None:
                    raise BadRequestError("group_id is missing")
                group = self._group_or_none(settings.group_id)
                if group is None:
                    raise RefusedError("Missing/invalid group")
            elif settings.runner_type is RunnerType.PROJECT:
                if settings.project_id is None:
                    raise BadRequestError("project_id is missing")
                project = self._projects.get(settings.project_id)
                if project is None:
                    raise RefusedError("Missing/invalid project")
                project_ids.append(project.id)
            # Memberships are not modelled: the one non-administrator owns every group and project, so only an
            # instance runner (:create_instance_runner, administrators only) is beyond it.
            if settings.runner_type is RunnerType.INSTANCE and not user.admin:
                raise ForbiddenError("Insufficient permissions")
            problems = runner_validation_errors(settings)
            if problems:
                raise RefusedError(to_sentence(problems))
            runner = Runner(
                id=self._take_id("runner"),
                # Authentication tokens are "glrt-" plus 20 characters.
                token=CREATED_RUNNER_TOKEN_PREFIX + secrets.token_urlsafe(15),
                runner_type=settings.runner_type,
                description=settings.description,
                paused=settings.paused,
                locked=settings.locked,
                run_untagged=settings.run_untagged,
                tag_list=list(settings.tag_list),
                access_level=settings.access_level,
                maximum_timeout=settings.maximum_timeout,
                maintenance_note=settings.maintenance_note,
                created_at=self._clock(),
                group=group,
                project_ids=project_ids,
            )
            self._runners[runner.id] = runner
            return {"id": runner.id, "token": runner.token, "token_expires_at": None}

    def list_runners(self, filters: RunnerFilters, *, all_runners: bool) -> list[dict[str, Any]]:
        # GET /runners is "runners I own": instance runners only appear in GET /runners/all.
        return self._list_visible(filters, lambda runner: all_runners or runner.runner_type is not RunnerType.INSTANCE)

    def list_group_runners(self, group_ref: str | int, filters: RunnerFilters) -> list[dict[str, Any]]:
        """``GET /groups/:id/runners``: runners of the group and its ancestors, and instance runners."""
        with self.lock:  # reentrant: the listing below takes it again
            group = self._group(group_ref)
            return self._list_visible(
                filters,
                lambda runner: runner.runner_type is RunnerType.INSTANCE
                or (runner.runner_type is RunnerType.GROUP and self._within(group.full_path, runner.group)),
            )

    def list_project_runners(self, project_ref: str | int, filters: RunnerFilters) -> list[dict[str, Any]]:
        """``GET /projects/:id/runners``: runners assigned to the project, its groups' runners, instance runners."""
        with self.lock:  # reentrant: the listing below takes it again
            project = self._project(project_ref)
            return self._list_visible(
                filters,
                lambda runner: runner.runner_type is RunnerType.INSTANCE
                or (runner.runner_type is RunnerType.PROJECT and project.id in runner.project_ids)
                or (runner.runner_type is RunnerType.GROUP and self._within(project.namespace.full_path, runner.group)),
            )

    def _list_visible(self, filters: RunnerFilters, visible: Callable[[Runner], bool]) -> list[dict[str, Any]]:
        """The runners a listing shows (``visible``) that also pass the request's filters, as the API gives them."""
        with self.lock:
            now = self._clock()
            return [
                self._runner_json(runner, now)
                for runner in self._runners.values()
                if visible(runner) and self._runner_matches(runner, filters, now)
            ]

    def get_runner(self, runner_id: int) -> dict[str, Any]:
        with self.lock:
            return self._runner_detail_json(self._runner(runner_id))

    def all_runner_details(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self._runner_detail_json(r) for r in self._runners.values()]

    def update_runner(self, runner_id: int, changes: RunnerChanges, user: User = ADMIN) -> dict[str, Any]:
        with self.lock:
            runner = self._managed_runner(runner_id, user)
            if changes.description is not None:
                runner.description = changes.description
            if changes.paused is not None:
                runner.paused = changes.paused
            if changes.locked is not None:
                runner.locked = changes.locked
            if changes.run_untagged is not None:
                runner.run_untagged = changes.run_untagged
            if changes.tag_list is not None:
                runner.tag_list = list(changes.tag_list)
            if changes.access_level is not None:
                runner.access_level = changes.access_level
            if changes.maximum_timeout is not None:
                runner.maximum_timeout = changes.maximum_timeout
            if changes.maintenance_note is not None:
                runner.maintenance_note = changes.maintenance_note
            # Ci::Runners::UpdateRunnerService ticks the runner's queue after any update, so that a runner long
            # polling with its last X-GitLab-Last-Update looks at the queue again with its new settings.
            self._tick_runner_queue(runner)
            return self._runner_detail_json(runner)

    def delete_runner(self, runner_id: int, user: User = ADMIN) -> None:
        with self.lock:
            del self._runners[self._managed_runner(runner_id, user).id]

    def reset_runner_token(self, runner_id: int, user: User = ADMIN) -> dict[str, Any]:
        """``POST /runners/:id/reset_authentication_token``: the old token stops working at once."""
        with self.lock:
            runner = self._managed_runner(runner_id, user)
            runner.token = CREATED_RUNNER_TOKEN_PREFIX + secrets.token_urlsafe(15)
            return {"token": runner.token, "token_expires_at": None}

    def delete_runner_by_token(self, token: str) -> None:
        with self.lock:
            del self._runners[self._runner_by_token(token).id]

    def runner_jobs(self, runner_id: int, statuses: Sequence[JobStatus]) -> list[dict[str, Any]]:
        with self.lock:
            runner = self._runner(runner_id)
            jobs = [j for j in reversed(self._jobs.values()) if j.runner is runner]
            return [
                {**self._job_json(j), "project": self._project_summary_json(j.project)}
                for j in jobs
                if not statuses or j.status in statuses
            ]

    def runner_managers(self, runner_id: int) -> list[dict[str, Any]]:
        with self.lock:
            runner = self._runner(runner_id)
            now = self._clock()
            return [self._manager_json(m, now) for m in runner.managers.values()]

    def enable_project_runner(self, project_ref: str | int, runner_id: int) -> dict[str, Any]:
        with self.lock:
            project = self._project(project_ref)
            runner = self._runner(runner_id)
            if runner.runner_type is not RunnerType.PROJECT:
                raise ForbiddenError("Runner is not a project runner")
            if runner.locked and project.id not in runner.project_ids:
                raise ForbiddenError("Runner is locked")
            if project.id not in runner.project_ids:
                runner.project_ids.append(project.id)
            return self._runner_json(runner, self._clock())

    # -- runner agent API: authenticated by runner or job tokens, not by a user --

    def verify_runner(self, token: str, system_id: str | None) -> dict[str, Any]:
        """``POST /runners/verify`` (lib/api/ci/runner.rb): for a runner created with POST /user/runners (a
        ``glrt-`` token) it is ``authenticate_runner!(update_contacted_at: false)``, because "for runners that were
        created in the UI, we want to update the contacted_at value only when it starts polling for jobs". The
        runner manager of the system id is still made (Ci::Runner#ensure_manager), but neither it nor the runner
        is contacted: both stay ``never_contacted`` until the first ``POST /jobs/request``."""
        with self.lock:
            runner = self._runner_by_token(token)
            if system_id is None:
                # Documented: system_id is required when the token is a glrt- authentication token.
                raise BadRequestError("system_id is missing")
            self._touch(runner, system_id, contact=not token.startswith(CREATED_RUNNER_TOKEN_PREFIX))
            return {"id": runner.id, "token": runner.token, "token_expires_at": None}

    def request_job(self, token: str, system_id: str | None, last_update: str | None = None) -> JobRequestAnswer:
        """``POST /jobs/request`` as lib/api/ci/runner.rb answers it. The runner is contacted first. A paused
        runner gets no job and its queue value. A runner sending back the queue value that is still current
        (Ci::Runner#runner_queue_value_latest?) gets no job without the queue being looked at: nothing it could
        take became pending since. Otherwise it is handed the first queued job it may run, in the order
        Ci::Queue::BuildQueueService gives its kind of runner, or gets the queue value it looked at."""
        with self.lock:
            runner = self._runner_by_token(token)
            manager = self._touch(runner, system_id)
            if runner.paused:
                return JobRequestAnswer(None, self._ensure_runner_queue_value(runner))
            if last_update and self._ensure_runner_queue_value(runner) == last_update:
                return JobRequestAnswer(None, last_update)
            hold = self._held_requests.pop(runner.id, None)
        if hold is not None:
            # The active check above and the assignment below are separate steps in GitLab too: the API checks
            # ``current_runner.active?`` once (lib/api/ci/runner.rb, POST /jobs/request), then
            # Ci::RegisterJobService picks and assigns a job without looking at it again. A pause landing in
            # between does not stop this request.
            hold.wait()
        with self.lock:
            if runner.id not in self._runners:
                return JobRequestAnswer(None, None)
            new_update = self._ensure_runner_queue_value(runner)
            job = next((j for j in self._queue_for(runner) if self._matches(runner, j)), None)
            if job is None:
                return JobRequestAnswer(None, new_update)
            job.runner = runner
            job.runner_manager = manager
            # Job tokens are CI_JOB_TOKENs: "glcbt-" prefixed, valid only while the job runs.
            job.token = "glcbt-" + secrets.token_hex(16)
            self._transition(job, JobStatus.RUNNING)
            return JobRequestAnswer(self._job_payload_for_runner(job))

    def hold_job_request(self, runner_id: int) -> RequestHold:
        """Hold the runner's next ``POST /jobs/request`` that passes the active check, before a job is picked for
        it, until the hold is released: how a test places a pause between GitLab's two steps."""
        with self.lock:
            hold = RequestHold()
            self._held_requests[runner_id] = hold
            return hold

    def update_job_from_runner(
        self, job_id: int, job_token: str, state: str | None, failure_reason: str | None
    ) -> tuple[int, str]:
        """``PUT /jobs/:id``: the HTTP status GitLab answers (200, or 400 for a state a runner may not report)
        and the job's status afterwards, which GitLab sends back in ``Job-Status``."""
        with self.lock:
            job = self._job_for_runner(job_id, job_token)
            status = next((s for s in RUNNER_REPORTED_STATUSES if s.value == state), None)
            if status is None:
                return 400, job.status.value
            if status is JobStatus.RUNNING:
                # Ci::UpdateBuildStateService: "running" only keeps the job alive, ``build.touch if
                # build.needs_touch?``.
                self._touch_job(job)
            else:
                reason = failure_reason if failure_reason in FAILURE_REASONS else UNKNOWN_FAILURE
                self._transition(job, status, failure_reason=reason)
                self._process(job.pipeline)
            return 200, job.status.value

    def append_trace(self, job_id: int, job_token: str, content_range: str | None, data: bytes) -> tuple[int, str]:
        """``PATCH /jobs/:id/trace``: append ``data`` where ``Content-Range`` starts, which must be the end of the
        stored trace. Returns the trace's new size and the job's status (the ``Range`` and ``Job-Status``
        headers of the 202)."""
        with self.lock:
            job = self._job_for_runner(job_id, job_token)
            if content_range is None:
                raise MessageError(400, "400 Missing header Content-Range")
            # Ci::AppendBuildTraceService reads only the start ("start-end" or "start-end/total"); Ruby's to_i
            # makes anything unreadable a 0.
            digits = re.match(r"\s*(\d+)", content_range.split("-", 1)[0])
            start = int(digits.group(1)) if digits else 0
            if start != len(job.trace):
                # Nothing is appended; Range says how much GitLab has, for the runner to resend from there.
                raise MessageError(416, "416 Range Not Satisfiable", {"Range": f"0-{len(job.trace)}"})
            job.trace += data
            # Gitlab::Ci::Trace#unsafe_write! (lib/gitlab/ci/trace.rb) touches the job once the append is written.
            self._touch_job(job)
            return len(job.trace), job.status.value

    # -- delivery log --

    def log_execution(self, delivery: Delivery) -> Delivery:
        """Log one execution and update its hook's failure state (WebHooks::LogExecutionService): a success
        re-enables the hook, a failure backs it off. Returns the logged row, with its id."""
        with self.lock:
            now = self._clock()
            logged = replace(delivery, id=self._next_log_id, created_at=now)
            self._next_log_id += 1
            self._deliveries.append(logged)
            hook = self._hooks.get(delivery.hook_id)
            if hook is not None and self._auto_disabling:
                if logged.ok:
                    hook.recent_failures, hook.disabled_until = 0, None
                else:
                    self._back_off(hook, now)
            return logged

    def deliveries(self, since: int = 0) -> list[Delivery]:
        with self.lock:
            return self._deliveries[since:]

    # -- internals: the caller holds the lock --

    def _take_id(self, kind: str) -> int:
        value = self._next_id[kind]
        self._next_id[kind] = value + 1
        return value

    def _namespace(self, full_path: str, *, kind: str) -> Namespace:
        existing = self._namespaces.get(full_path)
        if existing is not None:
            return existing
        path = full_path.rsplit("/", 1)[-1]
        namespace = Namespace(
            id=self._take_id("namespace"),
            name=path.replace("-", " ").title() if kind == "group" else ADMIN_NAME,
            path=path,
            full_path=full_path,
            kind=kind,
        )
        self._namespaces[full_path] = namespace
        return namespace

    def _namespace_by_id(self, namespace_id: int, what: str = "Namespace") -> Namespace:
        for namespace in self._namespaces.values():
            if namespace.id == namespace_id:
                return namespace
        raise NotFoundError(what)

    def _group_or_none(self, group_id: int) -> Namespace | None:
        for namespace in self._namespaces.values():
            if namespace.kind == "group" and namespace.id == group_id:
                return namespace
        return None

    def _group(self, ref: str | int) -> Namespace:
        # Like projects, groups are addressed by numeric id or URL-encoded full path.
        for namespace in self._namespaces.values():
            if namespace.kind == "group" and (str(namespace.id) == str(ref) or namespace.full_path == ref):
                return namespace
        raise NotFoundError("Group")

    @staticmethod
    def _within(full_path: str, group: Namespace | None) -> bool:
        """Whether ``full_path`` is ``group`` or lies below it."""
        return group is not None and (full_path == group.full_path or full_path.startswith(group.full_path + "/"))

    def _managed_runner(self, runner_id: int, user: User) -> Runner:
        # Only administrators manage instance runners; group and project runners belong to their owner, which
        # the emulator's one non-administrator is for every group and project.
        runner = self._runner(runner_id)
        if runner.runner_type is RunnerType.INSTANCE and not user.admin:
            raise ForbiddenError()
        return runner

    def _project(self, ref: str | int) -> Project:
        # GitLab accepts a numeric id or the URL-encoded "namespace/path" wherever :id appears.
        if isinstance(ref, int) or ref.isdigit():
            project = self._projects.get(int(ref))
            if project is not None:
                return project
        else:
            for project in self._projects.values():
                if project.path_with_namespace == ref:
                    return project
        raise NotFoundError("Project")

    def _hook(self, project_ref: str | int, hook_id: int) -> Hook:
        project = self._project(project_ref)
        hook = self._hooks.get(hook_id)
        if hook is None or hook.project_id != project.id:
            raise NotFoundError("Hook")
        return hook

    def _pipeline(self, project_ref: str | int, pipeline_id: int) -> Pipeline:
        project = self._project(project_ref)
        pipeline = self._pipelines.get(pipeline_id)
        if pipeline is None or pipeline.project is not project:
            raise NotFoundError("Pipeline")
        return pipeline

    def _job(self, project_ref: str | int, job_id: int) -> Job:
        project = self._project(project_ref)
        job = self._jobs.get(job_id)
        if job is None or job.project is not project:
            raise NotFoundError("Job")
        return job

    def _runner(self, runner_id: int) -> Runner:
        runner = self._runners.get(runner_id)
        if runner is None:
            raise NotFoundError("Runner")
        return runner

    def _job_for_runner(self, job_id: int, job_token: str) -> Job:
        """The job a runner's request is about, authenticated by its job token (``authenticate_job!``): an
        unknown job is a 403, not a 404, so that gitlab-runner stops working on it. A valid request counts as
        the runner's heartbeat."""
        job = self._jobs.get(job_id)
        if job is None or job.token is None or not secrets.compare_digest(job.token, job_token):
            raise ForbiddenError()
        if job.status not in RUNNER_OWNED_STATUSES:
            raise ForbiddenError("Job is not processing on runner", {"Job-Status": job.status.value})
        now = self._clock()
        if job.runner is not None:
            job.runner.contacted_at = now
        if job.runner_manager is not None:
            job.runner_manager.contacted_at = now
        return job

    def _runner_by_token(self, token: str) -> Runner:
        for runner in self._runners.values():
            if secrets.compare_digest(runner.token, token):
                return runner
        raise ForbiddenError()

    def _apply_hook_changes(self, hook: Hook, changes: HookChanges) -> None:
        # Before GitLab 19.0, and with the webhook_signing_token flag off, the parameter is silently ignored.
        if self.signing_honoured():
            if changes.signing_token:
                hook.signing_token = parse_signing_token(changes.signing_token)
            elif changes.signing_token == "":
                hook.signing_token = None
        if changes.url:
            hook.url = changes.url
        if changes.token is not None:
            hook.token = changes.token or None
        if changes.name is not None:
            hook.name = changes.name
        if changes.description is not None:
            hook.description = changes.description
        hook.flags.update({k: v for k, v in changes.flags.items() if k in HOOK_EVENT_FLAGS})

    def _new_job(
        self,
        pipeline: Pipeline,
        name: str,
        stage: str,
        tags: Iterable[str],
        allow_failure: bool,
        when: When,
        script: tuple[str, ...],
        *,
        protected: bool,
    ) -> Job:
        now = self._clock()
        job = Job(
            id=self._take_id("job"),
            pipeline=pipeline,
            name=name,
            stage=stage,
            tags=list(tags),
            allow_failure=allow_failure,
            created_at=now,
            updated_at=now,
            when=when,
            script=script,
            protected=protected,
        )
        self._jobs[job.id] = job
        pipeline.jobs.append(job)
        self._emit_job_event(job)
        return job

    def _transition(self, job: Job, status: JobStatus, *, failure_reason: str | None = None) -> None:
        """Move a job to ``status``, keep its timestamps as GitLab does, and send the Job Hook if Ci::Build sends
        one for this transition."""
        if job.status == status:
            return
        now = self._clock()
        previous, job.status = job.status, status
        job.updated_at = now
        if status is JobStatus.PENDING:
            job.queued_at = now
            job.runner = None
            self._queue[job.id] = job
            # BuildQueueWorker runs Ci::UpdateBuildQueueService#tick: every runner that could pick the job gets a
            # new queue value (Ci::Runner#pick_build!), so its next request looks at the queue again. GitLab ticks
            # only runners contacted in the last three hours (with_recent_runner_queue); any other one's value has
            # expired (RUNNER_QUEUE_EXPIRY) and is new on its next request anyway.
            for runner in self._runners.values():
                if self._may_run(runner, job):
                    self._tick_runner_queue(runner)
        else:
            self._queue.pop(job.id, None)
        if status is JobStatus.RUNNING and job.started_at is None:
            job.started_at = now
        if status in FINISHED_STATUSES:
            job.finished_at = now
            job.token = None
        job.failure_reason = (failure_reason or UNKNOWN_FAILURE) if status is JobStatus.FAILED else None
        if status in HOOKED_STATUSES or (previous is JobStatus.PENDING and status is JobStatus.RUNNING):
            self._emit_job_event(job)

    def _process(self, pipeline: Pipeline) -> None:
        """Ci::PipelineProcessing::AtomicProcessingService, stage-ordered: a created job moves on once every job
        of the earlier stages is complete, to pending if their composite status suits its ``when`` and to skipped
        otherwise. Stages are taken in order and see what the earlier ones just became, as GitLab's status
        collection does."""
        for position, stage in enumerate(pipeline.stages):
            waiting = [j for j in pipeline.current_jobs if j.stage == stage and j.status is JobStatus.CREATED]
            if not waiting:
                continue
            earlier = [j for j in pipeline.current_jobs if pipeline.stages.index(j.stage) < position]
            before = composite_status(earlier) or JobStatus.SUCCESS
            if before not in FINISHED_STATUSES:
                continue
            for job in waiting:
                self._transition(job, JobStatus.PENDING if before in RUNS_AFTER[job.when] else JobStatus.SKIPPED)

    def _may_run(self, runner: Runner, job: Job) -> bool:
        """Whether the runner may take the job: active, and matching it (see ``_matches``)."""
        return not runner.paused and self._matches(runner, job)

    @staticmethod
    def _matches(runner: Runner, job: Job) -> bool:
        """Whether the job is for the runner, as Ci::RegisterJobService picks one (it does not look at ``active``,
        which the API checked before): owning the job's project, accepting its tags, and, when ``ref_protected``,
        only a protected job (Ci::RegisterJobService#each_build narrows such a runner's queue to
        ``builds_for_protected_runner``, the queue's ``protected`` rows; Gitlab::Ci::Matching::RunnerMatcher#matches?
        refuses an unprotected build to it)."""
        if runner.access_level is AccessLevel.REF_PROTECTED and not job.protected:
            return False
        if runner.runner_type is RunnerType.PROJECT and job.project.id not in runner.project_ids:
            return False
        if runner.runner_type is RunnerType.GROUP:
            group_path = runner.group.full_path if runner.group else ""
            project_ns = job.project.namespace.full_path
            if project_ns != group_path and not project_ns.startswith(group_path + "/"):
                return False
        if not job.tags:
            return runner.run_untagged
        return set(job.tags) <= set(runner.tag_list)

    def _touch(self, runner: Runner, system_id: str | None, *, contact: bool = True) -> RunnerManagerRecord | None:
        """``authenticate_runner!``: the runner manager of ``system_id`` is made if new (Ci::Runner#ensure_manager)
        and, unless ``contact`` is off, it and the runner are heard from now (their ``heartbeat``)."""
        now = self._clock()
        if contact:
            runner.contacted_at = now
        if system_id is None:
            return None
        manager = runner.managers.get(system_id)
        if manager is None:
            manager = RunnerManagerRecord(id=self._next_manager_id, system_id=system_id, created_at=now)
            self._next_manager_id += 1
            runner.managers[system_id] = manager
        if contact:
            manager.contacted_at = now
        return manager

    def _touch_job(self, job: Job) -> None:
        """``job.touch if job.needs_touch?`` (app/models/ci/build.rb): updated_at moves only when it is more than
        BUILD_TOUCH_AFTER old, so updates closer together than that do not keep a job alive for longer."""
        now = self._clock()
        if now - job.updated_at > BUILD_TOUCH_AFTER:
            job.updated_at = now

    def _ensure_runner_queue_value(self, runner: Runner) -> str:
        """Ci::Runner#ensure_runner_queue_value: the runner's queue value, a new one if it has none or it expired
        (set without overwriting, with a RUNNER_QUEUE_EXPIRY lifetime)."""
        now = self._clock()
        if (
            runner.queue_value is None
            or runner.queue_value_set_at is None
            or now - runner.queue_value_set_at >= RUNNER_QUEUE_EXPIRY
        ):
            runner.queue_value, runner.queue_value_set_at = secrets.token_hex(16), now
        return runner.queue_value

    def _tick_runner_queue(self, runner: Runner) -> None:
        """Ci::Runner#tick_runner_queue: a new queue value, overwriting the old one."""
        runner.queue_value, runner.queue_value_set_at = secrets.token_hex(16), self._clock()

    def _queue_for(self, runner: Runner) -> list[Job]:
        """The queued jobs in the order Ci::Queue::PendingBuildsStrategy hands them to this kind of runner. Group
        and project runners take them by id (``order``: ``build_id ASC``). Instance runners take them by fair
        scheduling (``builds_for_shared_runner``): first the jobs of projects with the fewest jobs running on
        instance runners (the Ci::RunningBuild rows of instance_type), then by id."""
        jobs = sorted(self._queue.values(), key=lambda j: j.id)
        if runner.runner_type is not RunnerType.INSTANCE:
            return jobs
        running = Counter(
            j.project.id
            for j in self._jobs.values()
            if j.status is JobStatus.RUNNING and j.runner is not None and j.runner.runner_type is RunnerType.INSTANCE
        )
        return sorted(jobs, key=lambda j: (running[j.project.id], j.id))

    def _stuck(self, job: Job, now: datetime) -> bool:
        """Ci::Build#stuck?: pending, and no runner of its project is ``match_build_if_online?`` (active, online
        and matching the build)."""
        return job.status is JobStatus.PENDING and not any(
            self._may_run(runner, job) and self._online(runner.contacted_at, now) for runner in self._runners.values()
        )

    @staticmethod
    def _protected_for(project: Project, ref: str, *, tag: bool) -> bool:
        """Project#protected_for?: ProtectedTag.protected? for a tag, ProtectedBranch.protected? for a branch."""
        if tag:
            return any(ref_matches(pattern, ref) for pattern in project.protected_tags)
        return any(ref_matches(branch.name, ref) for branch in project.protected_branches)

    def _runner_status(self, runner: Runner, now: datetime) -> RunnerStatus:
        """The REST API's ``status``, Ci::Runner#deprecated_rest_status: stale before anything else, then never
        contacted, and only a runner that is heard from and not paused is online or offline."""
        status = self._contact_status(runner.contacted_at, runner.created_at, now)
        if status in {RunnerStatus.ONLINE, RunnerStatus.OFFLINE} and runner.paused:
            return RunnerStatus.PAUSED
        return status

    @staticmethod
    def _online(contacted_at: datetime | None, now: datetime) -> bool:
        return contacted_at is not None and contacted_at > now - RUNNER_OFFLINE_AFTER

    @classmethod
    def _contact_status(cls, contacted_at: datetime | None, created_at: datetime, now: datetime) -> RunnerStatus:
        """Ci::HasRunnerStatus#status, shared by runners and runner managers."""
        if max(created_at, contacted_at or created_at) <= now - RUNNER_STALE_AFTER:
            return RunnerStatus.STALE
        if contacted_at is None:
            return RunnerStatus.NEVER_CONTACTED
        return RunnerStatus.ONLINE if cls._online(contacted_at, now) else RunnerStatus.OFFLINE

    def _in_scope(self, runner: Runner, scope: str, now: datetime) -> bool:
        """Ci::Runner's scopes, which the ``type``, ``status``, ``paused`` and ``scope`` filters name. These are
        queries, not the ``status`` field: a stale runner last heard from long ago is also ``offline``, and a
        paused runner is ``online`` while it keeps asking for jobs."""
        deadline = now - RUNNER_STALE_AFTER
        scopes: dict[str, Callable[[], bool]] = {
            "active": lambda: not runner.paused,
            "paused": lambda: runner.paused,
            "online": lambda: self._online(runner.contacted_at, now),
            "offline": lambda: runner.contacted_at is not None and not self._online(runner.contacted_at, now),
            "never_contacted": lambda: runner.contacted_at is None,
            "stale": lambda: runner.created_at <= deadline
            and (runner.contacted_at is None or runner.contacted_at <= deadline),
            "shared": lambda: runner.runner_type is RunnerType.INSTANCE,
            "specific": lambda: runner.runner_type is not RunnerType.INSTANCE,
        }
        return runner.runner_type.value == scope if scope in RUNNER_TYPES else scopes[scope]()

    def _runner_matches(self, runner: Runner, filters: RunnerFilters, now: datetime) -> bool:
        """Every given filter narrows the listing further (``apply_filter`` chains the scopes)."""
        scopes = [
            filters.scope,
            None if filters.runner_type is None else filters.runner_type.value,
            filters.status,
            None if filters.paused is None else ("paused" if filters.paused else "active"),
        ]
        if not all(self._in_scope(runner, scope, now) for scope in scopes if scope is not None):
            return False
        return set(filters.tag_list) <= set(runner.tag_list)

    def _pipeline_status(self, pipeline: Pipeline) -> JobStatus:
        return composite_status(pipeline.current_jobs) or JobStatus.SUCCESS

    def _pipeline_times(self, pipeline: Pipeline) -> tuple[datetime | None, datetime | None]:
        jobs = pipeline.current_jobs
        started = [j.started_at for j in jobs if j.started_at is not None]
        finished = [j.finished_at for j in jobs if j.finished_at is not None]
        done = self._pipeline_status(pipeline) in FINISHED_STATUSES
        return (min(started) if started else None, max(finished) if done and finished else None)

    # -- webhooks --

    def _emit_job_event(self, job: Job) -> None:
        hooks = [h for h in self._hooks.values() if h.project_id == job.project.id and h.flags["job_events"]]
        if not hooks:
            return
        body = json.dumps(self._job_hook_body(job)).encode()
        now = self._clock()
        for hook in hooks:
            # A disabled hook is not executed at all: the event is never sent, not even later.
            if not self._executable(hook, now):
                continue
            # Job Hooks are executed by Sidekiq workers, each with its own request store and no request UUID to
            # inherit, so every hook execution gets a new X-Gitlab-Event-UUID (RecursionDetection::UUID
            # #uuid_for_hook) and a new Idempotency-Key (WebHookService#generate_idempotency_key).
            self._on_event(
                OutgoingEvent(
                    self._hook_target(hook),
                    JOB_HOOK,
                    str(uuid.uuid4()),
                    str(uuid.uuid4()),
                    body,
                    build_status=job.status.value,
                )
            )

    def _hook_target(self, hook: Hook) -> HookTarget:
        return HookTarget(
            hook_id=hook.id,
            project_id=hook.project_id,
            url=hook.url,
            token=hook.token,
            # Modelled as read when the hook executes: turned off again, it stops signing what it had stored
            # while the hook keeps reporting signing_token_present (the harsher reading of !231325).
            signing_token=hook.signing_token if self.signing_honoured() else None,
            enable_ssl_verification=hook.flags["enable_ssl_verification"],
        )

    def _alert_status(self, hook: Hook, now: datetime) -> str:
        """WebHooks::AutoDisabling#alert_status."""
        if not self._auto_disabling:
            return "executable"
        if self._temporarily_disabled(hook, now):
            return "temporarily_disabled"
        if hook.recent_failures > PERMANENTLY_DISABLED_FAILURE_THRESHOLD:
            return "disabled"
        return "executable"

    def _temporarily_disabled(self, hook: Hook, now: datetime) -> bool:
        return (
            hook.disabled_until is not None
            and hook.disabled_until >= now
            and TEMPORARILY_DISABLED_FAILURE_THRESHOLD < hook.recent_failures <= PERMANENTLY_DISABLED_FAILURE_THRESHOLD
        )

    def _executable(self, hook: Hook, now: datetime) -> bool:
        return self._alert_status(hook, now) == "executable"

    def _back_off(self, hook: Hook, now: datetime) -> None:
        """WebHooks::AutoDisabling#backoff!: count the failure; past the grace of 3, disable for a backoff that
        starts at a minute and doubles per further failure, up to a day. A hook already disabled is left as is."""
        if not self._executable(hook, now):
            return
        failures = min(hook.recent_failures + 1, PERMANENTLY_DISABLED_FAILURE_THRESHOLD + 1)
        if failures > TEMPORARILY_DISABLED_FAILURE_THRESHOLD:
            exponent = hook.recent_failures - TEMPORARILY_DISABLED_FAILURE_THRESHOLD
            backoff = min(max(INITIAL_BACKOFF * BACKOFF_GROWTH_FACTOR**exponent, INITIAL_BACKOFF), MAX_BACKOFF)
            hook.disabled_until = now + backoff
        hook.recent_failures = failures

    def _hook_time(self, key: str, at: datetime | None) -> dict[str, str | None]:
        if self._legacy_timestamps:
            return {key: legacy_time(at)}
        return {key: iso_ms(at), f"{key}_iso": iso_s(at)}

    def _job_hook_body(self, job: Job) -> dict[str, Any]:
        pipeline, project = job.pipeline, job.project
        now = self._clock()
        pipeline_started, pipeline_finished = self._pipeline_times(pipeline)
        runner = job.runner
        return {
            "object_kind": "build",
            "ref": pipeline.ref,
            "tag": pipeline.tag,
            "before_sha": pipeline.sha,
            "sha": pipeline.sha,
            "build_id": job.id,
            "build_name": job.name,
            "build_stage": job.stage,
            "build_status": job.status.value,
            **self._hook_time("build_created_at", job.created_at),
            **self._hook_time("build_started_at", job.started_at),
            **self._hook_time("build_finished_at", job.finished_at),
            "build_duration": seconds_between(job.started_at, job.finished_at),
            "build_queued_duration": seconds_between(job.queued_at, job.started_at or now),
            "build_allow_failure": job.allow_failure,
            "build_failure_reason": job.failure_reason or UNKNOWN_FAILURE,
            "retries_count": job.retries_count,
            "pipeline_id": pipeline.id,
            "project_id": project.id,
            # GitLab sends the project's full name here ("Namespace / Name"); use project.path_with_namespace
            # for a stable key.
            "project_name": project.name_with_namespace,
            "user": {"id": ADMIN_USER_ID, "name": ADMIN_NAME, "email": ADMIN_EMAIL, "avatar_url": AVATAR_URL},
            # Here commit.id is the pipeline id, not a SHA: a long-standing GitLab quirk.
            "commit": {
                "id": pipeline.id,
                "name": None,
                "sha": pipeline.sha,
                "message": COMMIT_MESSAGE,
                "author_name": ADMIN_NAME,
                "author_email": ADMIN_EMAIL,
                "author_url": f"{self.external_url}/{ADMIN_USERNAME}",
                "status": self._pipeline_status(pipeline).value,
                "duration": seconds_between(pipeline_started, pipeline_finished),
                **self._hook_time("started_at", pipeline_started),
                **self._hook_time("finished_at", pipeline_finished),
            },
            "repository": {
                "name": project.name,
                "url": self._ssh_url(project),
                "description": project.description,
                "homepage": self._web_url(project),
                "git_ssh_url": self._ssh_url(project),
                "git_http_url": f"{self._web_url(project)}.git",
                "visibility_level": 0,
            },
            "project": {
                "id": project.id,
                "name": project.name,
                "description": project.description,
                "web_url": self._web_url(project),
                "avatar_url": None,
                "git_ssh_url": self._ssh_url(project),
                "git_http_url": f"{self._web_url(project)}.git",
                "namespace": project.namespace.name,
                "visibility_level": 0,
                "path_with_namespace": project.path_with_namespace,
                "default_branch": DEFAULT_BRANCH,
                "ci_config_path": None,
            },
            # The only tags a Job Hook carries are the runner's, and only once a runner took the job.
            "runner": None
            if runner is None
            else {
                "active": not runner.paused,
                "runner_type": runner.runner_type.value,
                "is_shared": runner.runner_type is RunnerType.INSTANCE,
                "id": runner.id,
                "description": runner.description,
                "tags": list(runner.tag_list),
            },
            "environment": None,
        }

    # -- API representations --

    def _web_url(self, project: Project) -> str:
        return f"{self.external_url}/{project.path_with_namespace}"

    def _ssh_url(self, project: Project) -> str:
        host = self.external_url.split("://", 1)[-1].split(":", 1)[0]
        return f"git@{host}:{project.path_with_namespace}.git"

    def _user_json(self, user: User = ADMIN) -> dict[str, Any]:
        return {
            "id": user.id,
            "username": user.username,
            "name": user.name,
            "state": "active",
            "locked": False,
            "avatar_url": AVATAR_URL,
            "web_url": f"{self.external_url}/{user.username}",
            "created_at": iso_ms(EPOCH),
            "bio": "",
            "location": "",
            "public_email": "",
            "linkedin": "",
            "twitter": "",
            "website_url": "",
            "organization": "",
        }

    def _project_summary_json(self, project: Project) -> dict[str, Any]:
        return {
            "id": project.id,
            "description": project.description,
            "name": project.name,
            "name_with_namespace": project.name_with_namespace,
            "path": project.path,
            "path_with_namespace": project.path_with_namespace,
            "created_at": iso_ms(project.created_at),
        }

    def _project_json(self, project: Project) -> dict[str, Any]:
        namespace = project.namespace
        return {
            **self._project_summary_json(project),
            "default_branch": DEFAULT_BRANCH,
            "visibility": "private",
            "web_url": self._web_url(project),
            "ssh_url_to_repo": self._ssh_url(project),
            "http_url_to_repo": f"{self._web_url(project)}.git",
            "namespace": {
                "id": namespace.id,
                "name": namespace.name,
                "path": namespace.path,
                "kind": namespace.kind,
                "full_path": namespace.full_path,
                "parent_id": None,
                "web_url": f"{self.external_url}/{namespace.full_path}",
            },
            "archived": False,
            "jobs_enabled": True,
            "shared_runners_enabled": True,
        }

    @staticmethod
    def _protected_branch_json(branch: ProtectedBranch) -> dict[str, Any]:
        """API::Entities::ProtectedBranch, its access levels as API::Entities::ProtectedRefAccess."""

        def levels(level: int) -> list[dict[str, Any]]:
            return [
                {
                    "id": branch.id,
                    "access_level": level,
                    "access_level_description": PROTECTED_REF_ACCESS_LEVELS[level],
                }
            ]

        return {
            "id": branch.id,
            "name": branch.name,
            "push_access_levels": levels(branch.push_access_level),
            "merge_access_levels": levels(branch.merge_access_level),
            "allow_force_push": branch.allow_force_push,
        }

    def _hook_json(self, hook: Hook) -> dict[str, Any]:
        # GitLab never returns secrets, only whether one is set.
        return {
            "id": hook.id,
            "url": hook.url,
            "name": hook.name,
            "description": hook.description,
            "project_id": hook.project_id,
            **hook.flags,
            "push_events_branch_filter": None,
            "branch_filter_strategy": "wildcard",
            "alert_status": self._alert_status(hook, self._clock()),
            "disabled_until": iso_ms(hook.disabled_until),
            "url_variables": [],
            "custom_headers": [],
            "custom_webhook_template": None,
            "created_at": iso_ms(hook.created_at),
            # Both fields came with signing tokens (gitlab-org/gitlab!231325, GitLab 19.0); older versions
            # answer neither.
            **(
                {"token_present": hook.token is not None, "signing_token_present": hook.signing_token is not None}
                if self.hook_token_fields
                else {}
            ),
        }

    @staticmethod
    def _hook_log_json(delivery: Delivery) -> dict[str, Any]:
        """API::Entities::WebHookLog. An execution that got no answer is logged with the status "internal error"
        (WebHookService::InternalErrorResponse)."""
        return {
            "id": delivery.id,
            "url": delivery.url,
            "trigger": JOB_HOOKS_TRIGGER,
            "request_headers": delivery.request_headers,
            "request_data": delivery.payload,
            "response_headers": delivery.response_headers,
            "response_body": delivery.response_body,
            "execution_duration": delivery.duration,
            "response_status": "internal error" if delivery.status_code is None else str(delivery.status_code),
            "created_at": iso_ms(delivery.created_at),
        }

    def _commit_json(self, pipeline: Pipeline) -> dict[str, Any]:
        return {
            "id": pipeline.sha,
            "short_id": pipeline.sha[:8],
            "title": COMMIT_MESSAGE.strip(),
            "message": COMMIT_MESSAGE,
            "author_name": ADMIN_NAME,
            "author_email": ADMIN_EMAIL,
            "created_at": iso_ms(pipeline.created_at),
        }

    def _pipeline_json(self, pipeline: Pipeline, *, detailed: bool) -> dict[str, Any]:
        status = self._pipeline_status(pipeline)
        started, finished = self._pipeline_times(pipeline)
        summary = {
            "id": pipeline.id,
            "iid": pipeline.iid,
            "project_id": pipeline.project.id,
            "sha": pipeline.sha,
            "ref": pipeline.ref,
            "status": status.value,
            "source": "api",
            "created_at": iso_ms(pipeline.created_at),
            "updated_at": iso_ms(max([pipeline.created_at, *(t for t in (started, finished) if t)])),
            "web_url": f"{self._web_url(pipeline.project)}/-/pipelines/{pipeline.id}",
        }
        if not detailed:
            return summary
        return {
            **summary,
            "before_sha": pipeline.sha,
            "tag": pipeline.tag,
            "yaml_errors": None,
            "user": self._user_json(),
            "started_at": iso_ms(started),
            "finished_at": iso_ms(finished),
            "committed_at": None,
            "duration": seconds_between(started, finished),
            "queued_duration": None,
            "coverage": None,
            "detailed_status": {
                "icon": f"status_{status.value}",
                "text": status.value,
                "group": status.value,
            },
        }

    def _runner_json(self, runner: Runner, now: datetime) -> dict[str, Any]:
        status = self._runner_status(runner, now)
        return {
            "id": runner.id,
            "description": runner.description,
            "ip_address": "",
            "active": not runner.paused,
            "paused": runner.paused,
            "is_shared": runner.runner_type is RunnerType.INSTANCE,
            "runner_type": runner.runner_type.value,
            "name": None,
            "online": self._online(runner.contacted_at, now),
            "status": status.value,
        }

    def _runner_detail_json(self, runner: Runner) -> dict[str, Any]:
        now = self._clock()
        projects = [self._projects[p] for p in runner.project_ids if p in self._projects]
        return {
            **self._runner_json(runner, now),
            "architecture": None,
            "platform": None,
            "revision": None,
            "version": None,
            "contacted_at": iso_ms(runner.contacted_at),
            "maintenance_note": runner.maintenance_note,
            "projects": [
                {
                    "id": p.id,
                    "name": p.name,
                    "name_with_namespace": p.name_with_namespace,
                    "path": p.path,
                    "path_with_namespace": p.path_with_namespace,
                }
                for p in projects
            ],
            "groups": []
            if runner.group is None
            else [
                {
                    "id": runner.group.id,
                    "name": runner.group.name,
                    "web_url": f"{self.external_url}/groups/{runner.group.full_path}",
                }
            ],
            "tag_list": list(runner.tag_list),
            "run_untagged": runner.run_untagged,
            "locked": runner.locked,
            "access_level": runner.access_level.value,
            "maximum_timeout": runner.maximum_timeout,
        }

    def _manager_json(self, manager: RunnerManagerRecord, now: datetime) -> dict[str, Any]:
        return {
            "id": manager.id,
            "system_id": manager.system_id,
            "version": None,
            "revision": None,
            "platform": None,
            "architecture": None,
            "created_at": iso_ms(manager.created_at),
            "contacted_at": iso_ms(manager.contacted_at),
            "ip_address": "127.0.0.1",
            "status": self._contact_status(manager.contacted_at, manager.created_at, now).value,
        }

    def _job_json(self, job: Job) -> dict[str, Any]:
        pipeline, project = job.pipeline, job.project
        now = self._clock()
        data: dict[str, Any] = {
            "id": job.id,
            "status": job.status.value,
            "stage": job.stage,
            "name": job.name,
            "ref": pipeline.ref,
            "tag": pipeline.tag,
            "coverage": None,
            "allow_failure": job.allow_failure,
            "archived": False,
            "source": "api",
            "created_at": iso_ms(job.created_at),
            "started_at": iso_ms(job.started_at),
            "finished_at": iso_ms(job.finished_at),
            "erased_at": None,
            "duration": seconds_between(job.started_at, job.finished_at or (now if job.started_at else None)),
            "queued_duration": seconds_between(job.queued_at, job.started_at or now),
            "artifacts_expire_at": None,
            "artifacts": [],
            "tag_list": list(job.tags),
            "user": self._user_json(),
            "commit": self._commit_json(pipeline),
            "pipeline": {
                "id": pipeline.id,
                "iid": pipeline.iid,
                "project_id": project.id,
                "sha": pipeline.sha,
                "ref": pipeline.ref,
                "status": self._pipeline_status(pipeline).value,
                "source": "api",
                "created_at": iso_ms(pipeline.created_at),
                "web_url": f"{self._web_url(project)}/-/pipelines/{pipeline.id}",
            },
            "web_url": f"{self._web_url(project)}/-/jobs/{job.id}",
            "project": {"ci_job_token_scope_enabled": False},
            "runner": None if job.runner is None else self._runner_json(job.runner, now),
            "runner_manager": None if job.runner_manager is None else self._manager_json(job.runner_manager, now),
        }
        if job.status is JobStatus.FAILED:
            data["failure_reason"] = job.failure_reason
        return data

    def _job_payload_for_runner(self, job: Job) -> dict[str, Any]:
        """The ``POST /jobs/request`` answer: what gitlab-runner needs to run the job, in the shape of
        ``API::Entities::Ci::JobRequest::Response`` (lib/api/entities/ci/job_request/*.rb). The job's script is
        the one step ``Gitlab::Ci::Build::Step.from_commands`` makes of it."""
        pipeline, project, runner = job.pipeline, job.project, job.runner
        assert runner is not None and job.token is not None
        timeout = runner.maximum_timeout or 3600
        root = self._namespaces.get(project.namespace.full_path.split("/", 1)[0], project.namespace)
        public = {
            "CI_SERVER_URL": self.external_url,
            "CI_PROJECT_ID": str(project.id),
            "CI_PROJECT_PATH": project.path_with_namespace,
            "CI_PIPELINE_ID": str(pipeline.id),
            "CI_JOB_ID": str(job.id),
            "CI_JOB_NAME": job.name,
            "CI_JOB_STAGE": job.stage,
            "CI_COMMIT_REF_NAME": pipeline.ref,
            "CI_COMMIT_REF_PROTECTED": str(job.protected).lower(),
            "CI_COMMIT_SHA": pipeline.sha,
            "CI_RUNNER_ID": str(runner.id),
            "CI_RUNNER_TAGS": json.dumps(runner.tag_list),
        }
        variables = [{"key": k, "value": v, "public": True, "masked": False} for k, v in public.items()]
        # Ci::BuildRunnerPresenter#refspecs (app/presenters/ci/build_runner_presenter.rb): a tag is fetched as
        # itself, a branch into the remote's branches.
        git_ref = f"refs/tags/{pipeline.ref}" if pipeline.tag else f"refs/heads/{pipeline.ref}"
        refspec = f"+{git_ref}:{git_ref}" if pipeline.tag else f"+{git_ref}:refs/remotes/origin/{pipeline.ref}"
        variables.append({"key": "CI_JOB_TOKEN", "value": job.token, "public": False, "masked": True})
        return {
            "id": job.id,
            "token": job.token,
            "allow_git_fetch": True,
            "job_info": {
                "id": job.id,
                "name": job.name,
                "stage": job.stage,
                "pipeline_id": pipeline.id,
                "project_id": project.id,
                "project_name": project.name,
                "project_full_path": project.path_with_namespace,
                "namespace_id": project.namespace.id,
                "root_namespace_id": root.id,
                "organization_id": 1,
                "instance_id": None,
                "instance_uuid": None,
                "user_id": ADMIN_USER_ID,
                "scoped_user_id": None,
                "time_in_queue_seconds": seconds_between(job.queued_at, job.started_at),
                "project_jobs_running_on_instance_runners_count": "+Inf",
                "queue_size": len(self._queue),
                "queue_depth": 0,
            },
            "git_info": {
                "repo_url": f"{self._web_url(project)}.git",
                "ref": pipeline.ref,
                "sha": pipeline.sha,
                "before_sha": pipeline.sha,
                "ref_type": "tag" if pipeline.tag else "branch",
                "refspecs": [refspec],
                "depth": 20,
                "repo_object_format": "sha1",
                "protected": job.protected,
            },
            "runner_info": {"uuid": None, "timeout": timeout, "runner_session_url": None},
            "variables": variables,
            "steps": [
                {
                    "name": "script",
                    "script": list(job.script),
                    "timeout": timeout,
                    "when": "on_success",
                    "allow_failure": False,
                }
            ],
            "image": None,
            "services": [],
            "artifacts": [],
            "cache": [],
            "credentials": [],
            "features": {"trace_sections": True},
            "dependencies": [],
        }


def _status_matches(delivery: Delivery, statuses: Sequence[str]) -> bool:
    """WebHooks::WebHookLogsFinder's status filter: exact codes and the three categories."""
    code = delivery.status_code
    categories = {
        "successful": code is not None and 200 <= code < 300,
        "client_failure": code is not None and 400 <= code < 500,
        "server_failure": code is None or code >= 500,
    }
    return any(categories.get(status, str(code) == status) for status in statuses)
