"""``fleetctl gitlab connect``: create or update the project webhook that feeds runner-fleet its job events.

The hook gets job events only (runner-fleet ignores the rest anyway) and the secret token from SSM, so the
token travels from Parameter Store to GitLab without being printed. Re-running updates the existing hook with
the same URL instead of adding a second one. The CLI records the hook in the fleet table, so ``fleetctl status``
can later read it back (:func:`read_project_hook`): GitLab disables a hook after repeated failed deliveries, and
while it is disabled no job event reaches the fleet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chalicelib.errors import GitLabUnavailableError

STATUS_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class HookResult:
    project_id: int  # GitLab's numeric id, also when the project was named by its path
    hook_id: int
    created: bool


@dataclass(frozen=True)
class HookState:
    """Whether GitLab executes the hook: ``alert_status`` is ``executable``, ``temporarily_disabled`` (until
    ``disabled_until``) or ``disabled`` (for good, after 40 failures in a row)."""

    alert_status: str
    disabled_until: str | None


def connect_project_hook(
    gitlab_url: str,
    gitlab_token: str,
    project_id: int | str,
    webhook_url: str,
    secret_token: str,
    signing_secret: str | None = None,
    *,
    ssl_verify: bool = True,
) -> HookResult:
    import gitlab

    client = gitlab.Gitlab(gitlab_url, private_token=gitlab_token, ssl_verify=ssl_verify, timeout=10)
    project = client.projects.get(project_id, lazy=True)
    settings: dict[str, Any] = {
        "url": webhook_url,
        "token": secret_token,
        "job_events": True,
        "push_events": False,
        "pipeline_events": False,
        "merge_requests_events": False,
        "tag_push_events": False,
        "enable_ssl_verification": webhook_url.startswith("https://"),
    }
    if signing_secret:
        settings["signing_token"] = signing_secret
    for hook in project.hooks.list(iterator=True):
        if hook.url == webhook_url:
            for key, value in settings.items():
                setattr(hook, key, value)
            hook.save()
            return HookResult(project_id=int(hook.project_id), hook_id=int(hook.id), created=False)
    created = project.hooks.create(settings)
    return HookResult(project_id=int(created.project_id), hook_id=int(created.id), created=True)


def read_project_hook(
    gitlab_url: str,
    gitlab_token: str,
    project_id: int,
    hook_id: int,
    *,
    ssl_verify: bool = True,
    timeout: float = STATUS_TIMEOUT_SECONDS,
) -> HookState:
    """The hook's state from ``GET /projects/:id/hooks/:hook_id``; ``GitLabUnavailableError`` saying why when
    GitLab cannot be reached or refuses (a deleted hook, a token without access)."""
    import gitlab
    import requests

    client = gitlab.Gitlab(gitlab_url, private_token=gitlab_token, ssl_verify=ssl_verify, timeout=timeout)
    try:
        hook = client.projects.get(project_id, lazy=True).hooks.get(hook_id)
    except gitlab.exceptions.GitlabError as exc:
        raise GitLabUnavailableError(f"GitLab answered {exc.response_code}: {exc.error_message}") from None
    except requests.RequestException as exc:
        raise GitLabUnavailableError(f"GitLab unreachable: {type(exc).__name__}") from None
    until = getattr(hook, "disabled_until", None)
    return HookState(str(getattr(hook, "alert_status", "executable")), None if until is None else str(until))
