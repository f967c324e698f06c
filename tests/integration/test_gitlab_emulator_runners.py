"""The GitLab emulator's runner status and runner listings over real HTTP, on a clock the test moves. Each test
names the GitLab source whose behaviour it pins."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from fleetctl.sandbox.gitlab_emulator import GitLabEmulator
from tests.clocks import ManualClock
from tests.integration.test_gitlab_emulator import ADMIN, api

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def emu(clock: ManualClock) -> Iterator[GitLabEmulator]:
    with GitLabEmulator(admin_token=ADMIN, clock=clock) as emulator:
        yield emulator


def get(emu: GitLabEmulator, path: str, **params: Any) -> requests.Response:
    return requests.get(api(emu, path), headers={"PRIVATE-TOKEN": ADMIN}, params=params, timeout=5)


def runner(emu: GitLabEmulator, **settings: Any) -> dict[str, Any]:
    answer = requests.post(
        api(emu, "/user/runners"),
        headers={"PRIVATE-TOKEN": ADMIN},
        json={"runner_type": "instance_type", **settings},
        timeout=5,
    )
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def contact(emu: GitLabEmulator, token: str) -> None:
    """The runner asks for a job, which is GitLab hearing from it."""
    answer = requests.post(api(emu, "/jobs/request"), json={"token": token, "system_id": "s_1"}, timeout=5)
    assert answer.status_code == 204


def shown(emu: GitLabEmulator, runner_id: int) -> tuple[str, bool]:
    detail = get(emu, f"/runners/{runner_id}").json()
    return detail["status"], detail["online"]


def test_runner_status_is_stale_then_never_contacted_then_paused_online_or_offline(
    emu: GitLabEmulator, clock: ManualClock
) -> None:
    """The API's ``status`` is Ci::Runner#deprecated_rest_status (lib/api/entities/ci/runner.rb): ``stale`` when
    created and last contacted 7 days ago or more (STALE_TIMEOUT), else ``never_contacted``, else ``paused`` for
    a paused runner, else ``online`` when contacted within 2 hours (ONLINE_CONTACT_TIMEOUT) and ``offline``
    after. ``online`` itself ignores pausing (app/models/ci/runner.rb,
    app/models/concerns/ci/has_runner_status.rb)."""
    # given
    busy, idle, paused, silent = runner(emu), runner(emu), runner(emu, paused=True), runner(emu)
    for r in (busy, idle, paused):
        contact(emu, r["token"])

    # when time passes: the busy runner keeps asking, the idle one stops
    fresh = {name: shown(emu, r["id"]) for name, r in {"busy": busy, "paused": paused, "silent": silent}.items()}
    clock.advance(hours=2)
    contact(emu, busy["token"])
    two_hours = {name: shown(emu, r["id"]) for name, r in {"busy": busy, "idle": idle, "paused": paused}.items()}
    clock.advance(days=7)
    a_week = {name: shown(emu, r["id"])[0] for name, r in {"idle": idle, "paused": paused, "silent": silent}.items()}

    # then
    assert fresh == {"busy": ("online", True), "paused": ("paused", True), "silent": ("never_contacted", False)}
    assert two_hours == {"busy": ("online", True), "idle": ("offline", False), "paused": ("paused", False)}
    assert a_week == {"idle": "stale", "paused": "stale", "silent": "stale"}


def test_runner_list_filters_all_apply_together(emu: GitLabEmulator, clock: ManualClock) -> None:
    """``type``, ``status``, ``paused``, ``tag_list`` and the deprecated ``scope`` each narrow the listing further
    (lib/api/ci/runners.rb ``apply_filter``). Statuses filter by Ci::Runner's scopes, not by the ``status``
    field: a runner last heard from 8 days ago is both ``offline`` and ``stale``, and a paused runner still asking
    for jobs is ``online`` (app/models/concerns/ci/has_runner_status.rb, app/models/ci/runner.rb)."""
    # given
    linux = runner(emu, tag_list=["docker", "linux"])
    paused_linux = runner(emu, tag_list=["docker", "linux"], paused=True)
    windows = runner(emu, tag_list=["docker", "windows"])
    project = requests.post(
        api(emu, "/projects"), headers={"PRIVATE-TOKEN": ADMIN}, json={"name": "app"}, timeout=5
    ).json()
    mine = runner(emu, runner_type="project_type", project_id=project["id"], tag_list=["docker", "linux"])
    for r in (linux, paused_linux, windows, mine):
        contact(emu, r["token"])
    clock.advance(days=8)
    contact(emu, linux["token"])
    contact(emu, paused_linux["token"])

    def ids(**params: Any) -> set[int]:
        answer = get(emu, "/runners/all", **params)
        assert answer.status_code == 200, answer.text
        return {int(r["id"]) for r in answer.json()}

    # then
    assert ids(type="instance_type", status="online", paused="false", tag_list="docker,linux") == {linux["id"]}
    assert ids(type="instance_type", status="online", tag_list="linux") == {linux["id"], paused_linux["id"]}
    assert ids(status="offline") == ids(status="stale") == {windows["id"], mine["id"]}
    assert ids(scope="shared", status="offline") == {windows["id"]}
    assert ids(scope="specific", tag_list="linux") == {mine["id"]}
    assert ids(status="paused") == {paused_linux["id"]}
    assert ids(type="project_type", paused="true") == set()


@pytest.mark.parametrize(
    ("path", "params", "answer"),
    [
        ("/runners/all", {"type": "foo"}, {"error": "type does not have a valid value"}),
        ("/runners", {"status": "bar"}, {"error": "status does not have a valid value"}),
        (
            "/runners/all",
            {"type": "foo", "paused": "maybe", "status": "bar"},
            {"error": "type does not have a valid value, paused is invalid, status does not have a valid value"},
        ),
        ("/runners/all", {"scope": "everything"}, {"error": "scope does not have a valid value"}),
        # A scope Grape knows but GET /runners does not take (it lists only by status there).
        ("/runners", {"scope": "instance_type"}, {"message": "Scope contains invalid value"}),
    ],
)
def test_an_invalid_runner_filter_is_a_400(
    emu: GitLabEmulator, path: str, params: dict[str, str], answer: dict[str, str]
) -> None:
    """Grape's ``values:`` validation refuses a filter value outside its list with ``{"error": "<param> does not
    have a valid value"}``, every bad parameter named in one answer; ``filter_runners`` refuses a scope the
    listing does not allow (lib/api/ci/runners.rb)."""
    # when
    response = get(emu, path, **params)

    # then
    assert (response.status_code, response.json()) == (400, answer)


def test_a_group_listing_ignores_a_scope_it_does_not_declare(emu: GitLabEmulator) -> None:
    """``GET /groups/:id/runners`` declares the filters but not the deprecated ``scope``, so a scope sent there is
    neither validated nor applied (lib/api/ci/runners.rb, the groups resource)."""
    # given
    project_id = emu.create_project("acme/app")
    group_id = get(emu, f"/projects/{project_id}").json()["namespace"]["id"]
    mine = runner(emu, runner_type="group_type", group_id=group_id)

    # when
    response = get(emu, "/groups/acme/runners", scope="nonsense", type="group_type")

    # then
    assert response.status_code == 200, response.text
    assert [r["id"] for r in response.json()] == [mine["id"]]
