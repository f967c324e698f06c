"""The GitLab emulator's StuckCiJobsWorker over real HTTP, on a clock the test moves: running jobs nobody updates
and pending jobs nobody can run are failed with ``stuck_or_timeout_failure``, with GitLab's own limits. Each test
names the GitLab source whose behaviour it pins."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from fleetctl.sandbox.gitlab_emulator import GitLabEmulator, JobSpec
from tests.clocks import ManualClock
from tests.integration.test_gitlab_emulator import (
    Receiver,
    admin,
    api,
    hook,
    new_runner,
    receiver,
    receiver_factory,
    request_job,
)

__all__ = ["receiver", "receiver_factory"]  # fixtures shared with the main suite

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def emu(emulator_factory: Callable[..., GitLabEmulator], clock: ManualClock) -> GitLabEmulator:
    return emulator_factory(clock=clock)


def report(emu: GitLabEmulator, job: dict[str, Any], state: str) -> requests.Response:
    """gitlab-runner's ``PUT /jobs/:id`` with the job's token."""
    return requests.put(api(emu, f"/jobs/{job['id']}"), json={"token": job["token"], "state": state}, timeout=5)


def status(emu: GitLabEmulator, project_id: int, job_id: int) -> tuple[str, str | None]:
    job = emu.job(project_id, job_id)
    return job["status"], job.get("failure_reason")


def job_ids(emu: GitLabEmulator, project_id: int, pipeline_id: int) -> dict[str, int]:
    return {j["name"]: int(j["id"]) for j in emu.jobs_of_pipeline(project_id, pipeline_id)}


def test_a_running_job_nobody_updates_for_an_hour_is_failed_as_stuck(
    emu: GitLabEmulator, clock: ManualClock, receiver: Receiver
) -> None:
    """Ci::StuckBuilds::DropRunningService drops running builds created and updated more than
    BUILD_RUNNING_OUTDATED_TIMEOUT (1 hour) ago with ``stuck_or_timeout_failure``
    (app/services/ci/stuck_builds/drop_running_service.rb). ``drop!`` fails the job as any failure does: its Job
    Hook is sent, later stages are skipped, and the runner's next update is refused."""
    # given a running job of a two-stage pipeline
    project_id = emu.create_project("acme/app")
    hook(emu, project_id, receiver.url)
    pipeline_id = emu.create_pipeline(project_id, [JobSpec("build", stage="build"), JobSpec("test")])
    job = request_job(emu, new_runner(emu)["token"]).json()

    # when an hour passes without an update, and then a moment more
    clock.advance(hours=1)
    on_the_hour = emu.drop_stuck_jobs()
    clock.advance(seconds=1)
    past_the_hour = emu.drop_stuck_jobs()
    emu.wait_for_deliveries(timeout=5)

    # then
    assert (on_the_hour, past_the_hour) == ([], [job["id"]])
    assert status(emu, project_id, job["id"]) == ("failed", "stuck_or_timeout_failure")
    assert emu.jobs_of_pipeline(project_id, pipeline_id)[1]["status"] == "skipped"
    [failed] = [b for b in receiver.bodies() if b["build_status"] == "failed"]
    assert (failed["build_id"], failed["build_failure_reason"]) == (job["id"], "stuck_or_timeout_failure")
    assert report(emu, job, "success").status_code == 403


def test_runner_updates_keep_a_job_alive_only_when_they_touch_it(emu: GitLabEmulator, clock: ManualClock) -> None:
    """ "Updated" is the job's ``updated_at``. ``PUT /jobs/:id`` with ``running`` (Ci::UpdateBuildStateService) and
    a trace ``PATCH`` (Gitlab::Ci::Trace#unsafe_write!) move it only ``if job.needs_touch?``, when it is more than
    15 minutes old (app/models/ci/build.rb): an update ten minutes after the job started does not count."""
    # given two running jobs
    project_id = emu.create_project("acme/app")
    emu.create_pipeline(project_id, [JobSpec("early"), JobSpec("traced")])
    token = new_runner(emu)["token"]
    early, traced = request_job(emu, token).json(), request_job(emu, token).json()

    # when one is updated after 10 minutes, the other's log after 20
    clock.advance(minutes=10)
    report(emu, early, "running")
    clock.advance(minutes=10)
    patched = requests.patch(
        api(emu, f"/jobs/{traced['id']}/trace"),
        data=b"$ make\n",
        headers={"JOB-TOKEN": traced["token"], "Content-Range": "0-6"},
        timeout=5,
    )
    clock.advance(minutes=41)
    first_pass = emu.drop_stuck_jobs()
    clock.advance(minutes=20)
    second_pass = emu.drop_stuck_jobs()

    # then the early update did not count, the log did, for an hour
    assert patched.status_code == 202
    assert (first_pass, second_pass) == ([early["id"]], [traced["id"]])


def test_a_pending_job_nobody_can_run_is_failed_after_an_hour(emu: GitLabEmulator, clock: ManualClock) -> None:
    """Ci::StuckBuilds::DropPendingService drops a pending build past BUILD_PENDING_STUCK_TIMEOUT (1 hour) that
    is ``stuck?``: no runner of its project is active, online and matching it (Ci::Build#stuck?,
    #any_runners_online?, Ci::Runner#match_build_if_online?). A matching runner last heard from two hours ago
    is offline (ONLINE_CONTACT_TIMEOUT) and does not count; neither does a paused one."""
    # given a job no online runner can take: the matching one is offline, the online one lacks the tag
    project_id = emu.create_project("acme/app")
    offline = new_runner(emu, tag_list=["gpu"])
    request_job(emu, offline["token"])  # heard from now, not again
    new_runner(emu, tag_list=["gpu"], paused=True)
    pipeline_id = emu.create_pipeline(project_id, [JobSpec("train", tags=["gpu"])])
    (job_id,) = job_ids(emu, project_id, pipeline_id).values()
    online = new_runner(emu, tag_list=["docker"], run_untagged=False)

    # when
    clock.advance(minutes=59)
    request_job(emu, online["token"])
    early = emu.drop_stuck_jobs()
    clock.advance(hours=1, minutes=2)
    request_job(emu, online["token"])
    late = emu.drop_stuck_jobs()

    # then
    assert (early, late) == ([], [job_id])
    assert status(emu, project_id, job_id) == ("failed", "stuck_or_timeout_failure")


def test_a_pending_job_a_busy_runner_could_take_waits_but_not_past_a_day(
    emu: GitLabEmulator, clock: ManualClock
) -> None:
    """A pending job with an online runner that could take it is not stuck, however long it waits for that
    runner, until BUILD_PENDING_OUTDATED_TIMEOUT (1 day): then DropPendingService drops it regardless
    (app/services/ci/stuck_builds/drop_pending_service.rb). A busy runner stays online through its running job's
    updates (``authenticate_job!(heartbeat_runner: true)``, lib/api/ci/helpers/runner.rb), which also keep that
    job alive."""
    # given a runner busy with one job while the other waits
    project_id = emu.create_project("acme/app")
    pipeline_id = emu.create_pipeline(project_id, [JobSpec("long"), JobSpec("waiting")])
    ids = job_ids(emu, project_id, pipeline_id)
    running = request_job(emu, new_runner(emu)["token"]).json()

    # when the runner keeps reporting its job for a day
    dropped: dict[int, list[int]] = {}
    for step in range(1, 26):
        clock.advance(minutes=59)
        assert report(emu, running, "running").status_code == 200
        dropped[step] = emu.drop_stuck_jobs()

    # then the waiting job outlived the hour, and was dropped once older than a day
    assert {step: ids for step, ids in dropped.items() if ids} == {25: [ids["waiting"]]}
    assert status(emu, project_id, ids["waiting"]) == ("failed", "stuck_or_timeout_failure")
    assert status(emu, project_id, ids["long"]) == ("running", None)


def test_the_stuck_pass_ends_at_the_first_pending_job_that_is_not_stuck(
    emu: GitLabEmulator, clock: ManualClock
) -> None:
    """DropPendingService walks pending builds past the hour oldest first and ``break``s at the first that is not
    stuck (``break unless build.stuck?``, app/services/ci/stuck_builds/drop_helpers.rb): a stuck job created
    after a job that could still run waits for a later pass."""
    # given an older job a busy runner could take, and a younger one nobody can
    project_id = emu.create_project("acme/app")
    older = emu.create_pipeline(project_id, [JobSpec("busy"), JobSpec("could-run")])
    running = request_job(emu, new_runner(emu)["token"]).json()
    clock.advance(minutes=1)
    younger = emu.create_pipeline(project_id, [JobSpec("nobody", tags=["gpu"])])
    could_run, nobody = job_ids(emu, project_id, older)["could-run"], job_ids(emu, project_id, younger)["nobody"]

    # when both are past the hour, the runner still busy
    clock.advance(hours=1, minutes=1)
    report(emu, running, "running")
    blocked = emu.drop_stuck_jobs()
    admin(emu, "POST", f"/projects/{project_id}/jobs/{could_run}/cancel")
    unblocked = emu.drop_stuck_jobs()

    # then
    assert (blocked, unblocked) == ([], [nobody])


def test_the_emulator_drops_stuck_jobs_in_the_background(
    emulator_factory: Callable[..., GitLabEmulator], clock: ManualClock
) -> None:
    """StuckCiJobsWorker is a cron job ('0 * * * *', config/initializers/1_settings.rb); the emulator runs its
    pass every ``stuck_jobs_interval`` real seconds, at its clock's time."""
    # given
    emu = emulator_factory(clock=clock, stuck_jobs_interval=0.05)
    project_id = emu.create_project("acme/app")
    emu.create_pipeline(project_id, [JobSpec("build")])
    job = request_job(emu, new_runner(emu)["token"]).json()

    # when
    time.sleep(0.2)
    still_running = status(emu, project_id, job["id"])
    clock.advance(hours=2)
    deadline = time.monotonic() + 5
    while status(emu, project_id, job["id"])[0] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)

    # then
    assert still_running == ("running", None)
    assert status(emu, project_id, job["id"]) == ("failed", "stuck_or_timeout_failure")
