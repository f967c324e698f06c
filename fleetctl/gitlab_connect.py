"""``fleetctl gitlab connect``: create or update the project webhook that feeds runner-fleet its job events.

The hook gets job events only (runner-fleet ignores the rest anyway) and the secret token from SSM, so the
token travels from Parameter Store to GitLab without being printed. Re-running updates the existing hook with
the same URL instead of adding a second one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HookResult:
    hook_id: int
    created: bool


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
            return HookResult(hook_id=int(hook.id), created=False)
    created = project.hooks.create(settings)
    return HookResult(hook_id=int(created.id), created=True)
