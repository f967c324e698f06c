"""The GitLab API as scale-up uses it: read a job, create, find, re-token and delete runners.

python-gitlab does the HTTP; it is imported on first use, so the webhook Lambda, which never calls GitLab,
does not pay for it at cold start. Every failure that a later attempt may fix (5xx, 429, timeouts, refused
connections, even 401/403 while someone fixes a token) becomes ``RetryableError``; a job GitLab no longer
knows (404) is simply gone. Retries are the jobs queue's business (a jittered, re-queued attempt), not a
sleep inside a Lambda invocation, so python-gitlab's own transient retries are off.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from chalicelib.config import RunnerType
from chalicelib.errors import RetryableError

DEFAULT_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class JobInfo:
    project_id: int
    job_id: int
    status: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class RunnerCredentials:
    runner_id: int
    token: str


class GitLabApi:
    def __init__(
        self,
        url: str,
        token: Callable[[], str],
        *,
        runner_type: RunnerType = RunnerType.INSTANCE,
        owner_id: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self._url = url
        self._token = token
        self._runner_type = runner_type
        self._owner_id = owner_id
        self._timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()

    def job(self, project_id: int, job_id: int) -> JobInfo | None:
        """The job's status and tags, or None when GitLab does not know it (deleted project or job)."""
        with self._call(f"GET job {project_id}:{job_id}", missing_ok=True):
            job = self._gitlab().projects.get(project_id, lazy=True).jobs.get(job_id)
            return JobInfo(project_id, job_id, str(job.status), tuple(str(t) for t in job.tag_list or ()))
        return None  # a 404: the contextmanager swallowed it

    def create_runner(
        self, *, description: str, tags: Sequence[str], run_untagged: bool, maximum_timeout: int
    ) -> RunnerCredentials:
        from gitlab.v4.objects import CurrentUserRunnerManager

        settings: dict[str, Any] = {
            "runner_type": self._runner_type.value,
            "description": description,
            "tag_list": list(tags),
            "run_untagged": run_untagged,
            # A project runner stays with its project; group and instance runners cannot be locked.
            "locked": self._runner_type is RunnerType.PROJECT,
            "access_level": "not_protected",
            "maximum_timeout": maximum_timeout,
            "paused": False,
        }
        if self._runner_type is RunnerType.GROUP:
            settings["group_id"] = self._owner_id
        elif self._runner_type is RunnerType.PROJECT:
            settings["project_id"] = self._owner_id
        with self._call("POST /user/runners"):
            created = CurrentUserRunnerManager(self._gitlab()).create(settings)
        return RunnerCredentials(int(created.id), str(created.token))

    def find_runner(self, description: str, tags: Sequence[str]) -> int | None:
        """A runner with exactly this description (and these tags), from a creation whose answer was lost."""
        with self._call("GET /runners/all"):
            listing = self._gitlab().runners_all.list(tag_list=list(tags), iterator=True)
            for runner in listing:
                if runner.description == description:
                    return int(runner.id)
        return None

    def reset_runner_token(self, runner_id: int) -> str:
        with self._call(f"POST /runners/{runner_id}/reset_authentication_token"):
            answer = self._gitlab().http_post(f"/runners/{runner_id}/reset_authentication_token")
        return str(answer["token"])

    def delete_runner(self, runner_id: int) -> None:
        """Delete a runner; one that is already gone counts as deleted."""
        with self._call(f"DELETE /runners/{runner_id}", missing_ok=True):
            self._gitlab().runners.delete(runner_id)

    def _gitlab(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import gitlab

                    self._client = gitlab.Gitlab(
                        self._url, private_token=self._token(), timeout=self._timeout, retry_transient_errors=False
                    )
        return self._client

    @contextmanager
    def _call(self, what: str, *, missing_ok: bool = False) -> Iterator[None]:
        import gitlab.exceptions
        import requests

        try:
            yield
        except gitlab.exceptions.GitlabError as exc:
            code = exc.response_code
            if code == 404 and missing_ok:
                return
            raise RetryableError(f"gitlab {what}: HTTP {code or 'error'}") from None
        except requests.exceptions.RequestException as exc:
            raise RetryableError(f"gitlab {what}: {type(exc).__name__}") from None
