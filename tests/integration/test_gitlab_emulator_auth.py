"""The GitLab emulator's access rules, hook signing by version and feature flag, and runner creation rules.

Each test names the gitlab-org/gitlab source or documentation page the rule comes from.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from fleetctl.sandbox.gitlab_emulator import GitLabEmulator, JobSpec
from tests.integration.conftest import EMULATOR_ADMIN_TOKEN

ADMIN = EMULATOR_ADMIN_TOKEN
SIGNING_TOKEN = "whsec_" + base64.b64encode(b"k" * 32).decode()
INSUFFICIENT = "The request requires higher privileges than provided by the access token."


def call(emu: GitLabEmulator, token: str, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, f"{emu.url}/api/v4{path}", headers={"PRIVATE-TOKEN": token}, timeout=5, **kwargs)


def with_token(emu: GitLabEmulator, *scopes: str, admin: bool = False, **kwargs: Any) -> str:
    token = "glpat-" + "-".join(scopes) + ("-admin" if admin else "")
    emu.add_token(token, scopes=scopes, admin=admin, **kwargs)
    return token


def group_runner(emu: GitLabEmulator, token: str, group_id: int, **settings: Any) -> requests.Response:
    return call(
        emu, token, "POST", "/user/runners", json={"runner_type": "group_type", "group_id": group_id, **settings}
    )


# -- token scopes ------------------------------------------------------------------------------------------------


def test_read_api_reads_but_may_not_write(emu: GitLabEmulator) -> None:
    """lib/api/api.rb registers ``api`` for every endpoint and ``read_api`` for GET and HEAD; a token without a
    registered scope gets lib/api/api_guard.rb's Rack::OAuth2 Forbidden(:insufficient_scope) naming them."""
    # given
    project_id = emu.create_project("acme/app")
    emu.create_pipeline(project_id, [JobSpec("build")])
    reader = with_token(emu, "read_api")

    # when
    read = call(emu, reader, "GET", f"/projects/{project_id}/jobs")
    write = call(emu, reader, "POST", f"/projects/{project_id}/hooks", json={"url": "https://example.com/h"})

    # then
    assert read.status_code == 200 and len(read.json()) == 1
    assert (write.status_code, write.json()) == (
        403,
        {"error": "insufficient_scope", "error_description": INSUFFICIENT, "scope": "api read_api"},
    )


def test_create_runner_creates_runners_and_nothing_else(emu: GitLabEmulator) -> None:
    """lib/api/user_runners.rb: ``allow_access_with_scope :create_runner, if: request.post?``."""
    # given
    group_id = emu.create_group("acme")
    creator = with_token(emu, "create_runner")
    reader = with_token(emu, "read_api")

    # when
    created = group_runner(emu, creator, group_id, tag_list=["docker"])
    listed = call(emu, creator, "GET", f"/groups/{group_id}/runners")
    refused = group_runner(emu, reader, group_id, tag_list=["docker"])

    # then
    assert created.status_code == 201 and created.json()["token"].startswith("glrt-")
    assert (listed.status_code, listed.json()["scope"]) == (403, "api read_api")
    assert (refused.status_code, refused.json()["scope"]) == (403, "create_runner api read_api")


def test_manage_runner_opens_the_runner_endpoints_from_gitlab_17_1(
    emulator_factory: Callable[..., GitLabEmulator],
) -> None:
    """lib/api/ci/runners.rb: ``allow_access_with_scope :manage_runner`` on /runners/:id paths, a scope added in
    GitLab 17.1 (gitlab-org/gitlab!153285); it does not cover the group or project listings."""
    for version, allowed in (("17.9.0", True), ("17.0.0", False)):
        # given
        emu = emulator_factory(version=version)
        group_id = emu.create_group("acme")
        runner_id = group_runner(emu, ADMIN, group_id, tag_list=["docker"]).json()["id"]
        manager = with_token(emu, "manage_runner")

        # when
        reset = call(emu, manager, "POST", f"/runners/{runner_id}/reset_authentication_token")
        listing = call(emu, manager, "GET", f"/groups/{group_id}/runners")
        deleted = call(emu, manager, "DELETE", f"/runners/{runner_id}")

        # then
        assert (reset.status_code, deleted.status_code) == ((201, 204) if allowed else (403, 403)), version
        assert listing.status_code == 403


def test_runners_all_is_for_administrators_only(emu: GitLabEmulator) -> None:
    """doc/api/runners.md "List all runners": administrators only; lib/api/ci/runners.rb authenticated_as_admin!
    (GitLab.com users are never administrators, so it is unavailable there)."""
    # given
    owner = with_token(emu, "api")
    admin = with_token(emu, "read_api", admin=True)

    # when
    refused = call(emu, owner, "GET", "/runners/all")
    allowed = call(emu, admin, "GET", "/runners/all")

    # then
    assert (refused.status_code, refused.json()) == (403, {"message": "403 Forbidden"})
    assert allowed.status_code == 200


def test_a_token_describes_itself_whatever_its_scopes(emu: GitLabEmulator) -> None:
    """lib/api/personal_access_tokens/self_information.rb allows every scope; the answer is
    Entities::PersonalAccessToken (doc/api/personal_access_tokens.md "Get a single personal access token")."""
    # given
    expires = date.today() + timedelta(days=30)
    token = with_token(emu, "create_runner", "manage_runner", expires_at=expires, name="fleet")

    # when
    answer = call(emu, token, "GET", "/personal_access_tokens/self")

    # then
    assert answer.status_code == 200
    body = answer.json()
    assert {k: body[k] for k in ("name", "scopes", "active", "revoked", "expires_at", "user_id")} == {
        "name": "fleet",
        "scopes": ["create_runner", "manage_runner"],
        "active": True,
        "revoked": False,
        "expires_at": expires.isoformat(),
        "user_id": 2,
    }
    assert set(body) >= {"id", "created_at", "last_used_at", "description"}


@pytest.mark.parametrize(
    ("state", "description"),
    [
        ("expired", "Token is expired. You can either do re-authorization or token refresh."),
        ("revoked", "Token was revoked. You have to re-authorize from the user."),
    ],
)
def test_expired_and_revoked_tokens_get_401_saying_so(emu: GitLabEmulator, state: str, description: str) -> None:
    """lib/api/api_guard.rb answers ExpiredError and RevokedError with Rack::OAuth2 Unauthorized(:invalid_token)."""
    # given
    expires = date.today() if state == "expired" else None  # a token expires at the start of its expiry date
    token = with_token(emu, "api", expires_at=expires)
    if state == "revoked":
        emu.revoke_token(token)

    # when
    answer = call(emu, token, "GET", "/personal_access_tokens/self")

    # then
    assert (answer.status_code, answer.json()) == (401, {"error": "invalid_token", "error_description": description})
    assert answer.headers["WWW-Authenticate"].startswith('Bearer realm="", error="invalid_token"')


# -- hook signing: GitLab 19.0, behind webhook_signing_token ---------------------------------------------------


class Receiver:
    """Records the headers of every delivery and answers 200."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        received = self.headers

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(dict(self.headers.items()))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.stop()


def signed_hook(emu: GitLabEmulator, receiver: Receiver) -> tuple[int, dict[str, Any]]:
    project_id = emu.create_project("acme/app")
    settings = {"url": receiver.url, "token": "t", "job_events": True, "signing_token": SIGNING_TOKEN}
    created = call(emu, ADMIN, "POST", f"/projects/{project_id}/hooks", json=settings)
    assert created.status_code == 201, created.text
    return project_id, created.json()


def deliver_one(emu: GitLabEmulator, project_id: int) -> None:
    emu.create_pipeline(project_id, [JobSpec("build")])
    emu.wait_for_deliveries(timeout=10)


@pytest.mark.parametrize("version", ["17.9.0", "18.11.0"])
def test_before_19_0_a_signing_token_is_silently_ignored(
    emulator_factory: Callable[..., GitLabEmulator], receiver: Receiver, version: str
) -> None:
    """doc/api/system_hooks.md history: ``signing_token``, ``token_present`` and ``signing_token_present``
    came in GitLab 19.0 (gitlab-org/gitlab!231325); before, the parameter is unknown and ignored."""
    # given
    emu = emulator_factory(version=version)
    emu.enable_feature("webhook_signing_token")  # a flag this version does not have changes nothing

    # when
    project_id, answer = signed_hook(emu, receiver)
    deliver_one(emu, project_id)

    # then
    assert "signing_token_present" not in answer and "token_present" not in answer
    assert receiver.headers and not [h for h in receiver.headers if "webhook-signature" in h]


def test_19_0_without_the_flag_ignores_the_signing_token_and_says_so(
    emulator_factory: Callable[..., GitLabEmulator], receiver: Receiver
) -> None:
    """gitlab-org/gitlab!231325: "signing_token is silently ignored when the webhook_signing_token feature flag is
    disabled"; the hook answer still carries signing_token_present."""
    # given
    emu = emulator_factory(version="19.0.0")

    # when
    project_id, answer = signed_hook(emu, receiver)
    deliver_one(emu, project_id)

    # then
    assert (answer["token_present"], answer["signing_token_present"]) == (True, False)
    assert receiver.headers and not [h for h in receiver.headers if "webhook-signature" in h]


def test_19_0_with_the_flag_signs_until_the_flag_is_turned_off(
    emulator_factory: Callable[..., GitLabEmulator], receiver: Receiver
) -> None:
    """gitlab-org/gitlab!230944: with webhook_signing_token enabled (Feature.enable), a hook with a signing token
    sends webhook-id, webhook-timestamp and webhook-signature; the flag is read when the hook executes."""
    # given
    emu = emulator_factory(version="19.0.0")
    emu.enable_feature("webhook_signing_token")
    project_id, answer = signed_hook(emu, receiver)

    # when
    deliver_one(emu, project_id)
    signed = list(receiver.headers)
    emu.disable_feature("webhook_signing_token")
    receiver.headers.clear()
    deliver_one(emu, project_id)

    # then
    assert answer["signing_token_present"] is True
    assert signed and all({"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(h) for h in signed)
    assert receiver.headers and not [h for h in receiver.headers if "webhook-signature" in h]


# -- runner creation: POST /user/runners -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"maximum_timeout": 599, "tag_list": ["docker"]}, "Maximum timeout needs to be at least 10 minutes"),
        (
            {"tag_list": [f"t{i}" for i in range(51)]},
            "Tags list Too many tags specified. Please limit the number of tags to 50",
        ),
        (
            {"run_untagged": False},
            "Tags list can not be empty when runner is not allowed to pick untagged jobs",
        ),
        ({"description": "d" * 1025}, "Description is too long (maximum is 1024 characters)"),
        ({"maintenance_note": "n" * 1025}, "Maintenance note is too long (maximum is 1024 characters)"),
        (
            {"run_untagged": False, "maximum_timeout": 60},
            "Tags list can not be empty when runner is not allowed to pick untagged jobs and "
            "Maximum timeout needs to be at least 10 minutes",
        ),
    ],
)
def test_a_runner_that_fails_gitlabs_validations_is_refused(
    emu: GitLabEmulator, settings: dict[str, Any], message: str
) -> None:
    """app/models/ci/runner.rb validations (tag_constraints with TAG_LIST_MAX_LENGTH 50, description and
    maintenance_note at most 1024, maximum_timeout >= 600); lib/api/user_runners.rb answers
    bad_request!(errors.to_sentence)."""
    # given
    group_id = emu.create_group("acme")

    # when
    answer = group_runner(emu, ADMIN, group_id, **settings)

    # then
    assert (answer.status_code, answer.json()) == (400, {"message": f"400 Bad request - {message}"})
    assert emu.runners() == []


def test_the_limits_themselves_are_accepted(emu: GitLabEmulator) -> None:
    """The same validations, at their bounds (app/models/ci/runner.rb)."""
    group_id = emu.create_group("acme")

    answer = group_runner(
        emu, ADMIN, group_id, tag_list=[f"t{i}" for i in range(50)], maximum_timeout=600, description="d" * 1024
    )

    assert answer.status_code == 201


@pytest.mark.parametrize(
    ("settings", "status", "body"),
    [
        ({"runner_type": "group_type"}, 400, {"error": "group_id is missing"}),
        ({"runner_type": "project_type"}, 400, {"error": "project_id is missing"}),
        ({"runner_type": "group_type", "group_id": 999}, 400, {"message": "400 Bad request - Missing/invalid group"}),
        (
            {"runner_type": "project_type", "project_id": 999},
            400,
            {"message": "400 Bad request - Missing/invalid project"},
        ),
        ({"runner_type": "instance_type"}, 403, {"message": "403 Forbidden - Insufficient permissions"}),
    ],
)
def test_a_runner_without_its_group_or_project_or_rights_is_refused(
    emu: GitLabEmulator, settings: dict[str, Any], status: int, body: dict[str, str]
) -> None:
    """lib/api/user_runners.rb (Grape ``requires :group_id`` / ``:project_id`` given the runner type), the
    runner creation strategies' validate_params ("Missing/invalid group"/"project") and authorized_user?
    (app/services/ci/runners/runner_creation_strategies/*.rb), forbidden!("Insufficient permissions")."""
    owner = with_token(emu, "api")

    answer = call(emu, owner, "POST", "/user/runners", json=settings)

    assert (answer.status_code, answer.json()) == (status, body)
