"""The simulator reads a team's job history from GitLab (the emulator, over real HTTP, through python-gitlab):
every page of ``GET /projects/:id/jobs``, and no further back than asked."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import gitlab
import pytest
from click.testing import CliRunner

from fleetctl.cli import main
from fleetctl.sandbox.gitlab_emulator import GitLabEmulator, JobSpec
from fleetctl.simulate.gitlab_history import read_projects
from tests.clocks import ManualClock
from tests.integration.conftest import EMULATOR_ADMIN_TOKEN
from tests.integration.test_gitlab_emulator import new_runner, request_job
from tests.integration.test_gitlab_emulator_pipelines import report

pytestmark = pytest.mark.timeout(60)
LIST_JOBS = ("GET", "/projects/:id/jobs")


def run_pipeline(
    emu: GitLabEmulator, clock: ManualClock, project_id: int, token: str, count: int, tags: list[str]
) -> None:
    """A pipeline of ``count`` jobs, each taken 5 s after the last finished and run for 30 s by the runner."""
    emu.create_pipeline(project_id, [JobSpec(f"job-{i}", "test", tags) for i in range(count)])
    for _ in range(count):
        clock.advance(seconds=5)
        answer = request_job(emu, token)
        assert answer.status_code == 201, answer.text
        clock.advance(seconds=30)
        assert report(emu, answer.json(), "success").status_code == 200


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def emu(emulator_factory: Callable[..., GitLabEmulator], clock: ManualClock) -> GitLabEmulator:
    return emulator_factory(clock=clock)


def client(emu: GitLabEmulator) -> gitlab.Gitlab:
    return gitlab.Gitlab(emu.url, private_token=EMULATOR_ADMIN_TOKEN, timeout=10)


def test_every_page_of_a_projects_jobs_is_read(emu: GitLabEmulator, clock: ManualClock) -> None:
    # given: 120 finished jobs, listed 50 a page
    project_id = emu.create_project("acme/app")
    runner: dict[str, Any] = new_runner(emu, tag_list=["docker"])
    run_pipeline(emu, clock, project_id, runner["token"], 120, ["docker"])
    before = emu.calls[LIST_JOBS]
    # when
    jobs = read_projects(client(emu), [str(project_id)], 14 * 86400, now=clock.now.timestamp(), per_page=50)
    # then
    assert emu.calls[LIST_JOBS] - before == 3
    assert len(jobs) == 120 and len({job.id for job in jobs}) == 120
    assert all(job.duration == 30 and job.tags == ("docker",) and job.project_id == project_id for job in jobs)
    # a job's pending time is its start less GitLab's queued_duration: all became pending with the pipeline
    pending = {job.pending_at for job in jobs}
    assert len(pending) == 1


def test_jobs_older_than_the_window_are_not_read(emu: GitLabEmulator, clock: ManualClock) -> None:
    # given: an old pipeline, three weeks later a new one
    project_id = emu.create_project("acme/app")
    runner: dict[str, Any] = new_runner(emu, tag_list=["docker"])
    run_pipeline(emu, clock, project_id, runner["token"], 60, ["docker"])
    clock.advance(days=21)
    run_pipeline(emu, clock, project_id, runner["token"], 40, ["docker"])
    before = emu.calls[LIST_JOBS]
    # when
    jobs = read_projects(client(emu), [str(project_id)], 14 * 86400, now=clock.now.timestamp(), per_page=30)
    # then: the new pipeline's 40, and the listing stopped at the first old job (page 2 of 4)
    assert len(jobs) == 40
    assert emu.calls[LIST_JOBS] - before == 2


def test_the_command_line_simulates_a_history_read_from_gitlab(
    emu: GitLabEmulator, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given
    first = emu.create_project("acme/app")
    second = emu.create_project("acme/lib")
    runner: dict[str, Any] = new_runner(emu, tag_list=["docker", "linux"], run_untagged=True)
    run_pipeline(emu, clock, first, runner["token"], 15, ["docker"])
    run_pipeline(emu, clock, second, runner["token"], 10, [])
    monkeypatch.setenv("GITLAB_URL", emu.url)
    monkeypatch.setenv("GITLAB_TOKEN", EMULATOR_ADMIN_TOKEN)
    # when: the emulator's clock is in March 2026, so a long window
    result = CliRunner().invoke(
        main,
        [
            "simulate",
            "--gitlab-project",
            f"{first},acme/lib",
            "--since",
            "3000d",
            "--config",
            "chalicelib/stages/dev.yaml",
            "--json",
        ],
    )
    # then
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["inputs"]["jobs"] == 25
    assert document["runs"][0]["total"]["jobs"] == 25
