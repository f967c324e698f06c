"""Reconcile's sweep for lost Job Hooks (``FactSource.sweep``) against the GitLab emulator over HTTP.

The sweep lists each recently active project's pending jobs (``GET /projects/:id/jobs?scope[]=pending``). It is
bounded: at most ``SWEEP_PROJECTS`` projects a run, taken in turn across runs, and no listing once the run's time
is up. One project GitLab refuses (403) or fails for (5xx) is skipped alone: the others are still swept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from chalicelib.gitlab_api import GitLabApi
from chalicelib.lifecycle.facts import SWEEP_PERIOD_SECONDS, SWEEP_PROJECTS, Facts, FactSource
from chalicelib.observability import metrics
from fleetctl.sandbox.gitlab_emulator import GitLabEmulator

ADMIN = "glpat-sweep-admin"
NOW = 1_800_000_000.0  # the start of a sweep period


@pytest.fixture(scope="module")
def emu() -> Iterator[GitLabEmulator]:
    emulator = GitLabEmulator(admin_token=ADMIN).start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def projects(emu: GitLabEmulator) -> dict[int, int]:
    """45 projects, each with one pending job: project id -> its job id."""
    found: dict[int, int] = {}
    for n in range(45):
        project_id = emu.create_project(f"sweep/app-{n}")
        pipeline_id = emu.create_pipeline(project_id, [{"name": "build", "tags": ["docker"]}])
        [job] = emu.jobs_of_pipeline(project_id, pipeline_id)
        found[project_id] = int(job["id"])
    return found


def source(emu: GitLabEmulator) -> FactSource:
    gitlab = GitLabApi(emu.url, lambda: ADMIN)
    return FactSource(None, None, None, gitlab)  # type: ignore[arg-type]  # the sweep reads GitLab alone


def facts(projects: list[int], now: float = NOW) -> Facts:
    return Facts(
        now=now,
        records={},
        launches=(),
        leases={},
        instances={},
        template_versions={},
        active_projects=tuple(projects),
        gitlab_runners=(),
    )


def swept(found: Facts) -> dict[int, list[int]]:
    by_project: dict[int, list[int]] = {}
    for job in found.pending_jobs or ():
        by_project.setdefault(job.project_id, []).append(job.job_id)
    return by_project


def failed_projects(capfd: pytest.CaptureFixture[str]) -> int:
    """``SweepProjectsFailed`` as the metrics flushed now count it (EMF documents on standard output)."""
    metrics.flush_metrics()
    total = 0
    for line in capfd.readouterr().out.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            total += int(sum(json.loads(line).get("SweepProjectsFailed", [])))
    return total


def test_each_run_lists_its_turn_of_the_projects_and_three_runs_cover_them_all(
    emu: GitLabEmulator, projects: dict[int, int]
) -> None:
    # given 45 active projects
    ids = sorted(projects)
    calls_before = emu.calls[("GET", "/projects/:id/jobs")]

    # when three runs a minute apart sweep
    runs = [swept(source(emu).sweep(facts(ids, NOW + SWEEP_PERIOD_SECONDS * n))) for n in range(3)]

    # then each listed at most SWEEP_PROJECTS projects, one request each, and together every pending job
    assert [len(run) for run in runs] == [SWEEP_PROJECTS, SWEEP_PROJECTS, 45 - 2 * SWEEP_PROJECTS]
    assert emu.calls[("GET", "/projects/:id/jobs")] - calls_before == 45
    every = {project: jobs for run in runs for project, jobs in run.items()}
    assert every == {project: [job] for project, job in projects.items()}


def test_a_project_gitlab_refuses_or_fails_for_is_skipped_and_the_others_are_swept(
    emu: GitLabEmulator, projects: dict[int, int], capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")  # the suite turns metrics off; this test reads them
    # given three active projects, GitLab answering 403 for the first and 503 for the second
    first, second, third = sorted(projects)[:3]
    emu.fail_next("GET", rf"/projects/{first}/jobs", status=403, count=10)
    emu.fail_next("GET", rf"/projects/{second}/jobs", status=503, count=10)
    try:
        # when a run sweeps
        found = source(emu).sweep(facts([first, second, third]))
    finally:
        emu.clear_faults()

    # then the third project's pending job is found, and the two failures are counted
    assert swept(found) == {third: [projects[third]]}
    assert failed_projects(capfd) == 2


def test_a_run_out_of_time_lists_no_more_projects(emu: GitLabEmulator, projects: dict[int, int]) -> None:
    # given a first project whose listing takes GitLab 0.6 s (and fails), and a run with 0.5 s left
    ids = sorted(projects)[:SWEEP_PROJECTS]
    emu.fail_next("GET", rf"/projects/{ids[0]}/jobs", status=503, delay=0.6, count=10)
    try:
        # when it sweeps
        found = source(emu).sweep(facts(ids), deadline=time.monotonic() + 0.5)
    finally:
        emu.clear_faults()

    # then it listed no other project once its time was up (each has a pending job the listing would show)
    assert found.pending_jobs == []
