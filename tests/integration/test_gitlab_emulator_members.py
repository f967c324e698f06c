"""The emulator's members API (``GET /groups/:id/members/all/:user_id``, ``/projects/:id/members/all/:user_id``,
lib/api/members.rb), which ``fleetctl doctor`` asks for the fleet token's role: the one non-administrator owns every
group and, through it, its projects; anyone else is no member (404)."""

from __future__ import annotations

import requests

from fleetctl.sandbox.gitlab_emulator import GitLabEmulator
from tests.integration.conftest import EMULATOR_ADMIN_TOKEN

OWNER_TOKEN = "glpat-members-owner"


def get(emu: GitLabEmulator, path: str, token: str) -> requests.Response:
    return requests.get(f"{emu.url}/api/v4{path}", headers={"PRIVATE-TOKEN": token}, timeout=10)


def test_the_owner_is_owner_of_a_group_and_of_its_projects(emu: GitLabEmulator) -> None:
    # given
    emu.add_token(OWNER_TOKEN, scopes=("read_api",))
    group = emu.create_group("team")
    project = emu.create_project("team/app")
    user_id = get(emu, "/personal_access_tokens/self", OWNER_TOKEN).json()["user_id"]

    # when
    in_group = get(emu, f"/groups/{group}/members/all/{user_id}", OWNER_TOKEN)
    in_project = get(emu, f"/projects/{project}/members/all/{user_id}", OWNER_TOKEN)

    # then
    assert in_group.status_code == 200
    assert in_group.json()["access_level"] == 50
    assert in_group.json()["id"] == user_id
    assert in_project.status_code == 200
    assert in_project.json()["access_level"] == 50


def test_a_user_who_is_no_member_gets_404(emu: GitLabEmulator) -> None:
    # given
    emu.add_token(OWNER_TOKEN, scopes=("read_api",))
    group = emu.create_group("team")
    admin_id = get(emu, "/user", EMULATOR_ADMIN_TOKEN).json()["id"]

    # then: the administrator is no member of the group, and nobody is user 999
    assert get(emu, f"/groups/{group}/members/all/{admin_id}", OWNER_TOKEN).status_code == 404
    assert get(emu, f"/groups/{group}/members/all/999", OWNER_TOKEN).status_code == 404
