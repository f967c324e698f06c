"""The GitLab API as the fleet uses it: read and retry jobs, list a project's pending jobs, read whether a
project hook is executed, and create, find, list, pause, re-token and delete runners.

python-gitlab does the HTTP; it is imported on first use, so the webhook Lambda, which never calls GitLab,
does not pay for it at cold start. Every failure that a later attempt may fix (5xx, 429, timeouts, refused
connections, even 401/403 while someone fixes a token) becomes ``RetryableError``; a job GitLab no longer
knows (404) is simply gone. Retries are the jobs queue's business (a jittered, re-queued attempt), not a
sleep inside a Lambda invocation, so python-gitlab's own transient retries are off.

The API token is read through a callable, again once ``token_max_age`` has passed (a rotated token takes effect
without a cold start) and at once after a 401 (a token revoked by its rotation); the client is rebuilt whenever
the token it holds changed, and a call refused with 401 is repeated once with the fresh token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from chalicelib.config import RunnerType
from chalicelib.errors import RetryableError

DEFAULT_TIMEOUT_SECONDS = 5.0
# How long a token read is used before it is read again; the same age as the SSM cache behind the token callable
# (runtime.GITLAB_TOKEN_MAX_AGE_SECONDS), so a rotation reaches GitLab calls within two such periods at most.
DEFAULT_TOKEN_MAX_AGE_SECONDS = 300.0

T = TypeVar("T")


@dataclass(frozen=True)
class JobInfo:
    project_id: int
    job_id: int
    status: str
    tags: tuple[str, ...]
    failure_reason: str = ""


class JobNotRetryableError(Exception):
    """GitLab refused to retry a job: "Job is not retryable" (403), as for a job that was retried already
    (lib/api/ci/jobs.rb, ``forbidden!('Job is not retryable') unless build.retryable?``)."""


def _epoch(value: Any) -> float:
    """Seconds since the epoch of GitLab's ISO 8601 timestamp (0 when absent)."""
    from datetime import datetime

    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() if value else 0.0


@dataclass(frozen=True)
class GitLabRunner:
    """One runner of the fleet's scope as GitLab lists it. ``status`` is the REST API's: ``online``,
    ``offline``, ``stale`` or ``never_contacted`` (a paused runner that is heard from is listed online or
    offline, with ``paused`` true)."""

    runner_id: int
    description: str
    status: str
    paused: bool


@dataclass(frozen=True)
class HookStatus:
    """Whether GitLab executes a project hook: ``alert_status`` is ``executable``, ``temporarily_disabled`` (until
    ``disabled_until``) or ``disabled`` (for good); GitLab sends a disabled hook's events to nobody."""

    alert_status: str
    disabled_until: str | None = None

    @property
    def executable(self) -> bool:
        return self.alert_status == "executable"


@dataclass(frozen=True)
class RunnerCredentials:
    runner_id: int
    token: str = field(repr=False)  # a glrt- token: never in a log line or a traceback's locals


class GitLabApi:
    """``token`` returns the API token (it may cache); ``fresh_token``, when given, reads it past any cache and
    is used after a 401. ``clock`` is monotonic seconds, injectable for tests."""

    def __init__(
        self,
        url: str,
        token: Callable[[], str],
        *,
        runner_type: RunnerType = RunnerType.INSTANCE,
        owner_id: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        fresh_token: Callable[[], str] | None = None,
        token_max_age: float = DEFAULT_TOKEN_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._token = token
        self._fresh_token = fresh_token or token
        self._runner_type = runner_type
        self._owner_id = owner_id
        self._timeout = timeout
        self._token_max_age = token_max_age
        self._clock = clock
        self._client: Any = None
        self._client_token = ""
        self._token_read_at = 0.0
        self._lock = threading.Lock()

    def job(self, project_id: int, job_id: int) -> JobInfo | None:
        """The job's status and tags, or None when GitLab does not know it (deleted project or job)."""

        def read(gl: Any) -> JobInfo:
            job = gl.projects.get(project_id, lazy=True).jobs.get(job_id)
            return JobInfo(
                project_id,
                job_id,
                str(job.status),
                tuple(str(t) for t in job.tag_list or ()),
                str(getattr(job, "failure_reason", None) or ""),
            )

        return self._call_or_none(f"GET job {project_id}:{job_id}", read)

    def create_runner(
        self,
        *,
        description: str,
        tags: Sequence[str],
        run_untagged: bool,
        maximum_timeout: int,
        access_level: str = "not_protected",
        maintenance_note: str = "",
    ) -> RunnerCredentials:
        """A new runner of the configured scope; ``access_level`` "ref_protected" limits it to protected refs, and
        ``maintenance_note`` says whose it is (chalicelib.naming.FleetOwner)."""
        from gitlab.v4.objects import CurrentUserRunnerManager

        settings: dict[str, Any] = {
            "runner_type": self._runner_type.value,
            "description": description,
            "tag_list": list(tags),
            "run_untagged": run_untagged,
            # A project runner stays with its project; group and instance runners cannot be locked.
            "locked": self._runner_type is RunnerType.PROJECT,
            "access_level": access_level,
            "maximum_timeout": maximum_timeout,
            "paused": False,
        }
        if maintenance_note:
            settings["maintenance_note"] = maintenance_note
        if self._runner_type is RunnerType.GROUP:
            settings["group_id"] = self._owner_id
        elif self._runner_type is RunnerType.PROJECT:
            settings["project_id"] = self._owner_id
        created = self._call("POST /user/runners", lambda gl: CurrentUserRunnerManager(gl).create(settings))
        return RunnerCredentials(int(created.id), str(created.token))

    def find_runner(self, description: str, tags: Sequence[str]) -> int | None:
        """A runner of the configured scope with exactly this description (and these tags), from a creation
        whose answer was lost."""
        path, query = self._runner_listing()
        if tags:  # with no tags to filter by, the parameter is left out rather than sent empty
            query = {**query, "tag_list": ",".join(tags)}

        def search(gl: Any) -> int | None:
            for runner in gl.http_list(path, query_data=query, iterator=True):
                if runner.get("description") == description:
                    return int(runner["id"])
            return None

        return self._call(f"GET {path}", search)

    def runners(self) -> list[GitLabRunner]:
        """Every runner of the configured scope, one paginated listing (100 a page)."""
        path, query = self._runner_listing()

        def listing(gl: Any) -> list[GitLabRunner]:
            return [
                GitLabRunner(
                    runner_id=int(runner["id"]),
                    description=str(runner.get("description") or ""),
                    status=str(runner.get("status") or ""),
                    paused=bool(runner.get("paused", not runner.get("active", True))),
                )
                for runner in gl.http_list(path, query_data={**query, "per_page": 100}, iterator=True)
            ]

        return self._call(f"GET {path}", listing)

    def runner_note(self, runner_id: int) -> str | None:
        """A runner's maintenance note ("" when it has none); None when GitLab no longer knows the runner."""
        path = f"/runners/{runner_id}"
        details = self._call_or_none(f"GET {path}", lambda gl: gl.http_get(path))
        return None if details is None else str(details.get("maintenance_note") or "")

    def set_paused(self, runner_id: int, paused: bool) -> bool:
        """Pause (no new job is given to it) or resume a runner; False when GitLab no longer knows it."""
        path = f"/runners/{runner_id}"
        done = self._call_or_none(f"PUT {path}", lambda gl: gl.http_put(path, post_data={"paused": paused}))
        return done is not None

    def running_jobs(self, runner_id: int) -> list[tuple[int, int]] | None:
        """``(project id, job id)`` of the jobs the runner is running now; None when GitLab no longer knows it."""
        path = f"/runners/{runner_id}/jobs"

        def listing(gl: Any) -> list[tuple[int, int]]:
            jobs = gl.http_list(path, query_data={"status": "running", "per_page": 100}, iterator=True)
            return [(int(job["project"]["id"]), int(job["id"])) for job in jobs]

        return self._call_or_none(f"GET {path}", listing)

    def pending_jobs(self, project_id: int) -> list[tuple[int, float]] | None:
        """``(job id, created at)`` of the project's pending jobs (one paginated listing); None when GitLab does not
        know the project."""
        path = f"/projects/{project_id}/jobs"

        def listing(gl: Any) -> list[tuple[int, float]]:
            jobs = gl.http_list(path, query_data={"scope[]": "pending", "per_page": 100}, iterator=True)
            return [(int(job["id"]), _epoch(job.get("created_at"))) for job in jobs]

        return self._call_or_none(f"GET {path}", listing)

    def hook_status(self, project_id: int, hook_id: int) -> HookStatus | None:
        """The project hook's state (``GET /projects/:id/hooks/:hook_id``); None when GitLab does not know the hook
        or the project, or the token may not see the project (GitLab answers 404 for both). A GitLab without
        auto-disabling shows no ``alert_status``: its hooks are always executed."""
        path = f"/projects/{project_id}/hooks/{hook_id}"
        hook = self._call_or_none(f"GET {path}", lambda gl: gl.http_get(path))
        if hook is None:
            return None
        until = hook.get("disabled_until")
        return HookStatus(str(hook.get("alert_status") or "executable"), None if until is None else str(until))

    def retry_job(self, project_id: int, job_id: int) -> int | None:
        """Retry a finished job: GitLab makes a new job (returned by id) from it. None when the job is gone;
        ``JobNotRetryableError`` when GitLab says it is not retryable (retried already, by us or anyone)."""
        import gitlab.exceptions

        path = f"/projects/{project_id}/jobs/{job_id}/retry"

        def retry(gl: Any) -> Any:
            try:
                return gl.http_post(path)
            except gitlab.exceptions.GitlabHttpError as exc:
                if exc.response_code == 403 and "not retryable" in str(exc.error_message):
                    raise JobNotRetryableError(f"{project_id}:{job_id}") from None
                raise

        answer = self._call_or_none(f"POST {path}", retry)
        return None if answer is None else int(answer["id"])

    def reset_runner_token(self, runner_id: int) -> str:
        path = f"/runners/{runner_id}/reset_authentication_token"
        answer = self._call(f"POST {path}", lambda gl: gl.http_post(path))
        return str(answer["token"])

    def delete_runner(self, runner_id: int) -> None:
        """Delete a runner; one that is already gone counts as deleted."""
        self._call_or_none(f"DELETE /runners/{runner_id}", lambda gl: gl.runners.delete(runner_id))

    def _runner_listing(self) -> tuple[str, dict[str, str]]:
        """The listing that holds the runners this fleet creates, readable with the token that creates them."""
        if self._runner_type is RunnerType.GROUP:
            # Owner of the group suffices; the listing also shows ancestor groups' and instance runners.
            return f"/groups/{self._owner_id}/runners", {"type": RunnerType.GROUP.value}
        if self._runner_type is RunnerType.PROJECT:
            # Maintainer of the project suffices; the listing also shows group and instance runners.
            return f"/projects/{self._owner_id}/runners", {"type": RunnerType.PROJECT.value}
        # Only administrators may list every runner (GitLab.com offers no such listing), but only administrators
        # may create instance runners too, so an instance-runner fleet already holds an administrator's token.
        return "/runners/all", {"type": RunnerType.INSTANCE.value}

    def _gitlab(self, *, refresh: bool = False) -> Any:
        """The client, rebuilt when a token read (due by age, or forced by ``refresh``) returns a new token."""
        with self._lock:
            now = self._clock()
            if refresh:
                token = self._fresh_token()
            elif self._client is None or now - self._token_read_at >= self._token_max_age:
                token = self._token()
            else:
                return self._client
            self._token_read_at = now
            if self._client is None or token != self._client_token:
                import gitlab

                self._client = gitlab.Gitlab(
                    self._url, private_token=token, timeout=self._timeout, retry_transient_errors=False
                )
                self._client_token = token
            return self._client

    def _call(self, what: str, call: Callable[[Any], T]) -> T:
        """``call(client)``; after a 401 the token is re-read and the call made once more. Every failure is a
        ``RetryableError``."""
        import gitlab.exceptions
        import requests

        try:
            try:
                return call(self._gitlab())
            except gitlab.exceptions.GitlabAuthenticationError:
                # A 401 means GitLab did nothing, so repeating the call is safe, even a create.
                return call(self._gitlab(refresh=True))
        except gitlab.exceptions.GitlabError as exc:
            raise RetryableError(f"gitlab {what}: HTTP {exc.response_code or 'error'}") from None
        except requests.exceptions.RequestException as exc:
            raise RetryableError(f"gitlab {what}: {type(exc).__name__}") from None

    def _call_or_none(self, what: str, call: Callable[[Any], T]) -> T | None:
        """As ``_call``, but a 404 (GitLab does not know the object) answers None."""
        import gitlab.exceptions

        def absent_is_none(gl: Any) -> T | None:
            try:
                return call(gl)
            except gitlab.exceptions.GitlabError as exc:
                if exc.response_code == 404:
                    return None
                raise

        return self._call(what, absent_is_none)
