"""Checking a GitLab personal access token before fleetctl stores it or acts with it.

GitLab grants a token's requests by its scopes (403 ``insufficient_scope`` otherwise) and by its user's rights.
A fleet whose token lacks a scope fails only when the first job arrives, inside a Lambda; so ``fleetctl
bootstrap`` (which stores the fleet's token) and ``fleetctl gitlab connect`` (which creates the hook with the
operator's token) ask GitLab about the token first (``GET /personal_access_tokens/self``, which any token may
read about itself) and refuse one that is expired, revoked or missing a scope, naming what is missing.

The scopes below are what each call runner-fleet makes needs (lib/api/api.rb, lib/api/user_runners.rb,
lib/api/ci/runners.rb, lib/api/ci/jobs.rb in gitlab-org/gitlab): ``api`` covers everything, ``read_api`` every GET,
``create_runner`` ``POST /user/runners``, ``manage_runner`` (GitLab 17.1 and later) the ``/runners/:id``
endpoints; retrying a job takes ``api`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from chalicelib.errors import RunnerFleetError


class GitLabTokenError(RunnerFleetError):
    """The token cannot do what it is for; the message says why (and which scopes are missing)."""


@dataclass(frozen=True)
class Need:
    """One thing the token is used for, and the scopes of which any one grants it."""

    what: str
    scopes: tuple[str, ...]


FLEET_NEEDS = (
    Need("read jobs and list the fleet's runners", ("read_api", "api")),
    Need("create runners (POST /user/runners)", ("create_runner", "api")),
    Need("reset runner tokens and delete runners (/runners/:id)", ("manage_runner", "api")),
)
# GitLab's jobs API (lib/api/ci/jobs.rb) registers no scope of its own: retrying a job takes ``api`` (and a user
# who may update the project's jobs, a Developer). Needed only while a pool retries jobs lost to interruptions.
RETRY_NEED = Need(
    "retry jobs lost to spot interruptions (POST /projects/:id/jobs/:job_id/retry; "
    "or set retry_interrupted_jobs: false on every pool)",
    ("api",),
)
CONNECT_NEEDS = (Need("create and update the project webhook", ("api",)),)


@dataclass(frozen=True)
class TokenInfo:
    """What ``GET /personal_access_tokens/self`` says about a token (never the token itself)."""

    name: str
    scopes: tuple[str, ...]
    active: bool
    revoked: bool
    expires_at: date | None
    is_admin: bool | None = None  # from GET /user; None when not asked

    @classmethod
    def from_api(cls, answer: dict[str, Any]) -> TokenInfo:
        expires = answer.get("expires_at")
        return cls(
            name=str(answer.get("name") or ""),
            scopes=tuple(str(s) for s in answer.get("scopes") or ()),
            active=bool(answer.get("active")),
            revoked=bool(answer.get("revoked")),
            expires_at=date.fromisoformat(expires) if isinstance(expires, str) and expires else None,
        )


def missing_needs(scopes: Sequence[str], needs: Sequence[Need]) -> list[Need]:
    """The needs none of whose scopes the token has."""
    return [need for need in needs if not any(scope in scopes for scope in need.scopes)]


def token_problems(info: TokenInfo, needs: Sequence[Need], *, admin_needed: bool, today: date) -> list[str]:
    """Why the token cannot serve; empty when it can."""
    if info.revoked:
        return [f"the token {info.name!r} is revoked"]
    if not info.active or (info.expires_at is not None and info.expires_at <= today):
        return [f"the token {info.name!r} expired on {info.expires_at}" if info.expires_at else "the token is inactive"]
    problems = [
        f"missing scope {' or '.join(need.scopes)} (to {need.what})" for need in missing_needs(info.scopes, needs)
    ]
    if admin_needed and not info.is_admin:
        problems.append("instance_type runners need an administrator's token; this token's user is not one")
    return problems


def read_token(gitlab_url: str, token: str, *, admin_needed: bool = False, ssl_verify: bool = True) -> TokenInfo:
    """Ask GitLab about ``token``; ``GitLabTokenError`` when GitLab refuses it (unknown, expired, revoked) or
    cannot be reached."""
    import gitlab
    import gitlab.exceptions
    import requests

    client = gitlab.Gitlab(gitlab_url, private_token=token, ssl_verify=ssl_verify, timeout=10)
    try:
        info = TokenInfo.from_api(_json(client.http_get("/personal_access_tokens/self")))
        if admin_needed:
            # GET /user carries is_admin only for an administrator's token.
            is_admin = _json(client.http_get("/user")).get("is_admin") is True
            info = TokenInfo(info.name, info.scopes, info.active, info.revoked, info.expires_at, is_admin)
        return info
    except gitlab.exceptions.GitlabAuthenticationError as exc:
        raise GitLabTokenError(f"GitLab refuses the token: {_reason(exc)}") from None
    except gitlab.exceptions.GitlabError as exc:
        raise GitLabTokenError(f"cannot check the token: GitLab answered HTTP {exc.response_code}") from None
    except requests.exceptions.RequestException as exc:
        raise GitLabTokenError(
            f"cannot check the token: GitLab at {gitlab_url} unreachable ({type(exc).__name__}): check gitlab.url "
            "in the stage file (or --gitlab-url) and the network"
        ) from None


def check_token(
    gitlab_url: str,
    token: str,
    needs: Sequence[Need],
    *,
    admin_needed: bool = False,
    today: date | None = None,
    ssl_verify: bool = True,
) -> TokenInfo:
    """The token's description when it can do every one of ``needs``; ``GitLabTokenError`` naming every
    problem otherwise."""
    info = read_token(gitlab_url, token, admin_needed=admin_needed, ssl_verify=ssl_verify)
    problems = token_problems(info, needs, admin_needed=admin_needed, today=today or date.today())
    if problems:
        raise GitLabTokenError("GitLab token refused: " + "; ".join(problems))
    return info


def _json(answer: Any) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise GitLabTokenError("cannot check the token: GitLab's answer is not a JSON object")
    return answer


def _reason(exc: Any) -> str:
    """GitLab's own words for a 401: ``error_description`` (expired, revoked) or its message."""
    import json

    try:
        body = json.loads(exc.response_body or b"{}")
    except ValueError:
        body = {}
    if isinstance(body, dict):
        description = body.get("error_description") or body.get("message")
        if description:
            return str(description)
    return f"HTTP {exc.response_code}"
