"""``GitLabApi`` against the GitLab emulator over HTTP: crash recovery without an administrator's token, token
rotation without a cold start, and the settings a runner is created with.

A group- or project-runner fleet holds the token of the group's Owner or the project's Maintainer, which GitLab
refuses ``GET /runners/all``; the emulator's default non-administrator token is exactly that.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from chalicelib.config import RunnerType
from chalicelib.errors import RetryableError
from chalicelib.gitlab_api import GitLabApi
from fleetctl.sandbox.gitlab_emulator import GitLabEmulator

ADMIN = "glpat-test-admin"
OWNER = "glpat-test-group-owner"
ROTATED = "glpat-test-group-owner-rotated"
TAGS = ("docker", "linux")
MAX_AGE = 300.0


@pytest.fixture
def emu() -> Iterator[GitLabEmulator]:
    emulator = GitLabEmulator(admin_token=ADMIN).start()
    emulator.add_token(OWNER)  # the owner of every group and project, not an administrator
    yield emulator
    emulator.stop()


@pytest.fixture
def project(emu: GitLabEmulator) -> dict[str, Any]:
    project_id = emu.create_project("platform/app")
    answer = requests.get(f"{emu.url}/api/v4/projects/{project_id}", headers={"PRIVATE-TOKEN": ADMIN}, timeout=5)
    return dict(answer.json())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TokenSource:
    """What runtime's SSM-backed token callable looks like from GitLabApi: a value that an operator rotates."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.reads = 0

    def __call__(self) -> str:
        self.reads += 1
        return self.value


def owner_of(runner_type: RunnerType, project: dict[str, Any]) -> int:
    return int(project["namespace"]["id"] if runner_type is RunnerType.GROUP else project["id"])


def verify(emu: GitLabEmulator, runner_token: str) -> int:
    answer = requests.post(
        f"{emu.url}/api/v4/runners/verify", json={"token": runner_token, "system_id": "s_test"}, timeout=5
    )
    return answer.status_code


def create(api: GitLabApi, description: str, **settings: Any) -> Any:
    return api.create_runner(description=description, tags=TAGS, run_untagged=False, maximum_timeout=3600, **settings)


# -- crash recovery: finding a runner whose creation answer was lost ------------------------------------------------


@pytest.mark.parametrize("runner_type", [RunnerType.GROUP, RunnerType.PROJECT], ids=["group", "project"])
def test_a_fleet_without_an_admin_token_recovers_a_runner_whose_creation_answer_was_lost(
    emu: GitLabEmulator, project: dict[str, Any], runner_type: RunnerType
) -> None:
    # given a group or project fleet whose token is no administrator's, and another runner with the same tags
    api = GitLabApi(emu.url, lambda: OWNER, runner_type=runner_type, owner_id=owner_of(runner_type, project))
    neighbour = create(api, "runner-fleet-dev/docker/i-0aaaaaaaaaaaaaaaa")
    description = "runner-fleet-dev/docker/i-0123456789abcdef0"
    # GitLab creates the runner, but the answer is lost
    emu.fail_next("POST", "/user/runners", status=502, after_processing=True)
    with pytest.raises(RetryableError):
        create(api, description)

    # when the retry looks for it and takes it over
    found = api.find_runner(description, TAGS)
    assert found is not None
    token = api.reset_runner_token(found)

    # then exactly one runner has that description, it is the one found, and the new token works
    mine = [r for r in emu.runners() if r["description"] == description]
    assert [r["id"] for r in mine] == [found]
    assert mine[0]["runner_type"] == runner_type.value
    assert found != neighbour.runner_id
    assert len(emu.runners()) == 2
    assert verify(emu, token) == 200
    assert emu.calls[("GET", "/runners/all")] == 0


def test_an_instance_fleet_finds_its_runner_in_the_admin_listing(emu: GitLabEmulator) -> None:
    # given an instance fleet: creating instance runners already takes an administrator's token
    api = GitLabApi(emu.url, lambda: ADMIN, runner_type=RunnerType.INSTANCE)
    description = "runner-fleet-dev/docker/i-0123456789abcdef0"
    emu.fail_next("POST", "/user/runners", status=500, after_processing=True)
    with pytest.raises(RetryableError):
        create(api, description)

    # when
    found = api.find_runner(description, TAGS)

    # then
    assert [r["id"] for r in emu.runners() if r["description"] == description] == [found]
    assert emu.calls[("GET", "/runners/all")] == 1


def test_a_runner_that_was_never_created_is_not_found(emu: GitLabEmulator, project: dict[str, Any]) -> None:
    api = GitLabApi(emu.url, lambda: OWNER, runner_type=RunnerType.GROUP, owner_id=owner_of(RunnerType.GROUP, project))
    create(api, "runner-fleet-dev/docker/i-0aaaaaaaaaaaaaaaa")

    assert api.find_runner("runner-fleet-dev/docker/i-0123456789abcdef0", TAGS) is None


# -- token rotation --------------------------------------------------------------------------------------------------


def test_a_rotated_token_is_used_once_its_age_has_passed(emu: GitLabEmulator, project: dict[str, Any]) -> None:
    # given an API that has been calling GitLab with the first token
    clock, token = Clock(), TokenSource(OWNER)
    api = GitLabApi(emu.url, token, token_max_age=MAX_AGE, clock=clock)
    assert api.job(project["id"], 1) is None  # any authenticated call; job 1 does not exist

    # when the token is rotated (the new one valid, the old one revoked) and the age has passed
    emu.add_token(ROTATED)
    token.value = ROTATED
    emu.revoke_token(OWNER)
    clock.now += MAX_AGE

    # then the next call succeeds with the same GitLabApi, using the new token at its first attempt
    calls_before = emu.calls[("GET", "/projects/:id/jobs/:job_id")]
    assert api.job(project["id"], 1) is None
    assert emu.calls[("GET", "/projects/:id/jobs/:job_id")] == calls_before + 1
    assert token.reads == 2


def test_the_token_is_read_again_only_once_its_age_has_passed(emu: GitLabEmulator, project: dict[str, Any]) -> None:
    clock, token = Clock(), TokenSource(OWNER)
    api = GitLabApi(emu.url, token, token_max_age=MAX_AGE, clock=clock)

    for _ in range(3):
        api.job(project["id"], 1)
        clock.now += MAX_AGE / 4
    assert token.reads == 1

    clock.now += MAX_AGE
    api.job(project["id"], 1)
    assert token.reads == 2


def test_a_revoked_token_is_replaced_at_once_on_401(emu: GitLabEmulator, project: dict[str, Any]) -> None:
    # given an API whose token was just rotated, long before its age has passed
    token = TokenSource(OWNER)
    api = GitLabApi(emu.url, token)
    api.job(project["id"], 1)
    emu.add_token(ROTATED)
    token.value = ROTATED
    emu.revoke_token(OWNER)

    # when / then the 401 makes it read the token again and repeat the call
    assert api.job(project["id"], 1) is None
    assert token.reads == 2


def test_a_401_with_no_new_token_stays_a_retryable_error(emu: GitLabEmulator, project: dict[str, Any]) -> None:
    token = TokenSource(OWNER)
    api = GitLabApi(emu.url, token)
    emu.revoke_token(OWNER)

    with pytest.raises(RetryableError, match="HTTP 401"):
        api.job(project["id"], 1)
    assert token.reads == 2  # one read at first use, one after the 401, no loop


def test_a_401_reads_the_token_past_its_cache(emu: GitLabEmulator, project: dict[str, Any]) -> None:
    # given a cached token callable that still returns the revoked token, and an uncached one
    cached, fresh = TokenSource(OWNER), TokenSource(OWNER)
    api = GitLabApi(emu.url, cached, fresh_token=fresh)
    api.job(project["id"], 1)
    emu.add_token(ROTATED)
    fresh.value = ROTATED
    emu.revoke_token(OWNER)

    # when / then
    assert api.job(project["id"], 1) is None
    assert (cached.reads, fresh.reads) == (1, 1)


# -- runner settings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("access_level", ["not_protected", "ref_protected"])
def test_a_runner_is_created_with_the_pools_access_level(
    emu: GitLabEmulator, project: dict[str, Any], access_level: str
) -> None:
    api = GitLabApi(emu.url, lambda: OWNER, runner_type=RunnerType.GROUP, owner_id=owner_of(RunnerType.GROUP, project))

    created = create(api, "runner-fleet-dev/release/i-0123456789abcdef0", access_level=access_level)

    [runner] = emu.runners()
    assert (runner["id"], runner["access_level"]) == (created.runner_id, access_level)


def test_a_token_without_admin_cannot_create_instance_runners(emu: GitLabEmulator) -> None:
    api = GitLabApi(emu.url, lambda: OWNER, runner_type=RunnerType.INSTANCE)

    with pytest.raises(RetryableError, match="HTTP 403"):
        create(api, "runner-fleet-dev/docker/i-0123456789abcdef0")
    assert emu.runners() == []


def test_a_pool_without_tags_finds_its_runner(emu: GitLabEmulator, project: dict[str, Any]) -> None:
    api = GitLabApi(emu.url, lambda: OWNER, runner_type=RunnerType.PROJECT, owner_id=project["id"])
    created = api.create_runner(
        description="runner-fleet-dev/any/i-0123456789abcdef0", tags=(), run_untagged=True, maximum_timeout=3600
    )

    assert api.find_runner("runner-fleet-dev/any/i-0123456789abcdef0", ()) == created.runner_id
