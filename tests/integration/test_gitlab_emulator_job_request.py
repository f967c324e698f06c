"""The emulator's ``POST /jobs/request`` answer: GitLab's documented shape, and the job's script in its steps."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleetctl.sandbox.gitlab_emulator import GitLabEmulator
from tests.conftest import PROJECT_DIR
from tests.integration.test_gitlab_emulator import admin, new_runner, request_job

FIXTURE = PROJECT_DIR / "tests" / "fixtures" / "gitlab" / "job_request_response.json"
NESTED = ("job_info", "git_info", "runner_info")


def take_job(emu: GitLabEmulator, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    project_id = emu.create_project("acme/app")
    emu.create_pipeline(project_id, jobs)
    runner = new_runner(emu, run_untagged=True)
    answer = request_job(emu, runner["token"])
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def test_a_job_request_answer_has_the_documented_shape(emu: GitLabEmulator) -> None:
    """``API::Entities::Ci::JobRequest::Response`` and its parts (gitlab-org/gitlab
    lib/api/entities/ci/job_request/response.rb, job_info.rb, git_info.rb, runner_info.rb, step.rb): the same keys
    at every level as the fixture drawn from them."""
    # given
    expected = json.loads(FIXTURE.read_text())

    # when
    job = take_job(emu, [{"name": "unit", "script": ["make test"]}])

    # then
    assert set(job) == set(expected)
    for part in NESTED:
        assert set(job[part]) == set(expected[part]), part
    assert [set(step) for step in job["steps"]] == [set(step) for step in expected["steps"]]
    assert job["job_info"]["project_full_path"] == "acme/app"


def test_the_job_script_reaches_the_runner_as_the_script_step(emu: GitLabEmulator) -> None:
    """``Gitlab::Ci::Build::Step.from_commands`` (lib/gitlab/ci/build/step.rb): one step named ``script`` with the
    job's script lines, the job timeout, ``when: on_success``, not allowed to fail."""
    # when
    job = take_job(emu, [{"name": "unit", "script": ["echo hi", "sleep 2", "exit 1"]}])

    # then
    (step,) = job["steps"]
    assert step == {
        "name": "script",
        "script": ["echo hi", "sleep 2", "exit 1"],
        "timeout": job["runner_info"]["timeout"],
        "when": "on_success",
        "allow_failure": False,
    }


@pytest.mark.parametrize(("script", "lines"), [(None, ["sleep 1"]), ("make", ["make"])])
def test_a_job_without_a_script_list_gets_one(emu: GitLabEmulator, script: Any, lines: list[str]) -> None:
    """``script:`` takes one line or a list (doc/ci/yaml/_index.md "script"); the emulator's own default for a job
    given none is a second's sleep, so a job is seen running before it succeeds."""
    # when
    job = take_job(emu, [{"name": "unit"} if script is None else {"name": "unit", "script": script}])

    # then
    assert job["steps"][0]["script"] == lines


def test_a_pipeline_job_with_a_malformed_script_is_a_400(emu: GitLabEmulator) -> None:
    """The emulator's pipeline extension refuses what .gitlab-ci.yml validation would (``script`` must be a
    string or an array of strings: lib/gitlab/ci/config/entry/commands.rb)."""
    # given
    project_id = emu.create_project("acme/app")

    # when
    answer = admin(
        emu, "POST", f"/projects/{project_id}/pipeline", json={"ref": "main", "jobs": [{"name": "a", "script": [1]}]}
    )

    # then
    assert answer.status_code == 400
