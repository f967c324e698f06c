"""``fleetctl gitlab connect``: create or update the project webhook that feeds runner-fleet its job events.

The hook gets job events only (runner-fleet ignores the rest anyway) and the secret token from SSM, so the
token travels from Parameter Store to GitLab without being printed. Re-running updates the existing hook with
the same URL instead of adding a second one.

Signed webhooks exist only on GitLab 19.0 and later, behind the ``webhook_signing_token`` feature flag; an
older GitLab, or one with the flag off, accepts ``signing_token`` and silently ignores it (gitlab-org/gitlab
!231325). So when the stage names a signing parameter, connect sends a signing secret and believes only
GitLab's answer: the secret is stored in SSM (where the webhook then requires signatures) only once the hook
says ``signing_token_present: true``. Otherwise the parameter says ``unsigned`` (its description says why), the
webhook checks ``X-Gitlab-Token`` alone, and connect says why. Until connect has written one of the two, a
configured signing parameter is missing and the webhook refuses every delivery: it never guesses.

The CLI records the hook in the fleet table, so ``fleetctl status`` can later read it back
(:func:`read_project_hook`): GitLab disables a hook after repeated failed deliveries, and while it is disabled no
job event reaches the fleet.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.config import FleetConfig
from chalicelib.errors import GitLabUnavailableError
from chalicelib.intake.secrets import UNSIGNED
from fleetctl.gitlab_token import CONNECT_NEEDS, check_token

SIGNING_FLAG = "webhook_signing_token"
STATUS_TIMEOUT_SECONDS = 5.0


def generate_signing_secret() -> str:
    """A Standard Webhooks secret, as GitLab takes it: ``whsec_`` and the base64 of a 32-byte key."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


@dataclass(frozen=True)
class HookResult:
    project_id: int  # GitLab's numeric id, also when the project was named by its path
    hook_id: int
    created: bool
    signed: bool = False
    # GitLab's answer about the signing secret: True, False, or None when it does not know the field at all.
    signing_token_present: bool | None = None


@dataclass(frozen=True)
class ConnectResult:
    hook: HookResult
    signing: str  # "signed", "not configured", or why signing is unavailable

    def describe(self, project: int | str, webhook_url: str) -> list[str]:
        verb = "created" if self.hook.created else "updated"
        lines = [f"{verb} hook {self.hook.hook_id} on project {project} -> {webhook_url} (job events)"]
        if self.hook.signed:
            lines.append("signing: on (webhook-signature verified, X-Gitlab-Token too)")
        else:
            lines.append(f"signing: off ({self.signing}); the webhook checks X-Gitlab-Token")
        return lines


def signing_unavailable_reason(present: bool | None) -> str:
    """Why GitLab did not take the signing secret, from the ``signing_token_present`` it answered."""
    if present is None:
        return "this GitLab ignores signing_token: signed webhooks need GitLab 19.0 or later"
    return (
        f"GitLab ignored signing_token: the {SIGNING_FLAG} feature flag is off "
        f"(an administrator enables it with Feature.enable(:{SIGNING_FLAG}))"
    )


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
    """Create or update the hook; ``signed`` says whether GitLab took ``signing_secret``."""
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
            return _result(hook.attributes, created=False, sent=bool(signing_secret))
    created = project.hooks.create(settings)
    return _result(created.attributes, created=True, sent=bool(signing_secret))


def _result(answer: dict[str, Any], *, created: bool, sent: bool) -> HookResult:
    present = answer.get("signing_token_present")
    present = present if isinstance(present, bool) else None
    return HookResult(
        int(answer["project_id"]),
        int(answer["id"]),
        created,
        signed=sent and present is True,
        signing_token_present=present,
    )


def connect(
    config: FleetConfig,
    ssm: Any,
    *,
    gitlab_url: str,
    gitlab_token: str,
    project_id: int | str,
    webhook_url: str,
    ssl_verify: bool = True,
    signing_factory: Callable[[], str] = generate_signing_secret,
) -> ConnectResult:
    """Check the token, connect the hook, and keep the stage's signing parameter in step with what GitLab took.

    ``GitLabTokenError`` when the token cannot manage the hook (missing ``api`` scope, expired, revoked)."""
    check_token(gitlab_url, gitlab_token, CONNECT_NEEDS, ssl_verify=ssl_verify)
    token = ssm.get_parameter(Name=config.webhook.token_parameter, WithDecryption=True)["Parameter"]["Value"]
    parameter = config.webhook.signing_secret_parameter
    if parameter is None:
        hook = connect_project_hook(gitlab_url, gitlab_token, project_id, webhook_url, token, ssl_verify=ssl_verify)
        return ConnectResult(hook, "not configured: the stage names no webhook.signing_secret_parameter")
    stored = read_parameter(ssm, parameter)
    if stored == UNSIGNED:
        stored = None
    # GitLab never returns a signing secret, so re-sending the stored one is what keeps the two equal.
    candidate = stored or signing_factory()
    hook = connect_project_hook(
        gitlab_url, gitlab_token, project_id, webhook_url, token, candidate, ssl_verify=ssl_verify
    )
    if hook.signed:
        if stored is None:
            # Stored only now: the webhook starts requiring signatures once GitLab already sends them. (A blank
            # value, which the webhook treats as a broken secret, is replaced.)
            ssm.put_parameter(Name=parameter, Value=candidate, Type="SecureString", Overwrite=True)
        return ConnectResult(hook, "signed")
    # GitLab does not sign (or stopped: flag turned off, an older GitLab): a webhook requiring signatures would
    # refuse every delivery, and GitLab disables a hook that keeps failing. Say so explicitly, and why.
    reason = signing_unavailable_reason(hook.signing_token_present)
    ssm.put_parameter(
        Name=parameter,
        Value=UNSIGNED,
        Type="SecureString",
        Overwrite=True,
        Description=f"GitLab does not sign: {reason}"[:1024],
    )
    return ConnectResult(hook, reason)


def read_parameter(ssm: Any, name: str) -> str | None:
    """A SecureString's value, decrypted and stripped; None when it does not exist or is blank."""
    try:
        value = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
    except ClientError as exc:
        if error_code(exc) != "ParameterNotFound":
            raise
        return None
    return str(value).strip() or None


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
