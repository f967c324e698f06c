"""The GitLab emulator's pipelines and the runner's side of a job, over real HTTP: stages processed in order,
Job Hooks only where GitLab sends them, and the job API gitlab-runner talks to (``PUT /jobs/:id``,
``PATCH /jobs/:id/trace``). Each test names the GitLab source or page whose behaviour it pins."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gitlab
import pytest
import requests

from fleetctl.sandbox.gitlab_emulator import GitLabEmulator, JobSpec
from fleetctl.sandbox.gitlab_model import When
from tests.integration.test_gitlab_emulator import (
    Receiver,
    admin,
    api,
    gl,
    hook,
    new_runner,
    receiver,
    receiver_factory,
    request_job,
)

__all__ = ["gl", "receiver", "receiver_factory"]  # fixtures shared with the main suite

pytestmark = pytest.mark.timeout(30)


def statuses(emu: GitLabEmulator, project_id: int, pipeline_id: int) -> dict[str, str]:
    return {j["name"]: j["status"] for j in emu.jobs_of_pipeline(project_id, pipeline_id)}


def job_id(emu: GitLabEmulator, project_id: int, pipeline_id: int, name: str) -> int:
    return next(int(j["id"]) for j in emu.jobs_of_pipeline(project_id, pipeline_id) if j["name"] == name)


def hooks_of(emu: GitLabEmulator, receiver: Receiver) -> list[tuple[str, str]]:
    """(job name, build_status) of every Job Hook so far, in no particular order."""
    emu.wait_for_deliveries(timeout=5)
    return sorted((b["build_name"], b["build_status"]) for b in receiver.bodies())


def report(emu: GitLabEmulator, job: dict[str, Any], state: str, **extra: Any) -> requests.Response:
    """gitlab-runner's ``PUT /jobs/:id`` with the job's token."""
    return requests.put(
        api(emu, f"/jobs/{job['id']}"), json={"token": job["token"], "state": state, **extra}, timeout=5
    )


def patch_trace(emu: GitLabEmulator, job: dict[str, Any], data: bytes, content_range: str | None) -> requests.Response:
    """gitlab-runner's trace upload: the job token in JOB-TOKEN, the bytes as a text/plain body."""
    headers = {"JOB-TOKEN": job["token"], "Content-Type": "text/plain"}
    if content_range is not None:
        headers["Content-Range"] = content_range
    return requests.patch(api(emu, f"/jobs/{job['id']}/trace"), data=data, headers=headers, timeout=5)


# -- stages --


def test_a_later_stage_stays_created_without_a_job_hook_until_the_earlier_stage_succeeds(
    emu: GitLabEmulator, gl: gitlab.Gitlab, receiver: Receiver
) -> None:
    """Jobs of a stage wait in ``created`` until every job of the earlier stages is complete, then become pending
    with a Job Hook of their own (app/services/ci/pipeline_processing/atomic_processing_service.rb,
    app/services/ci/process_build_service.rb; app/models/ci/build.rb executes hooks after
    ``any => [:pending]``)."""
    # given
    project_id = emu.create_project("acme/app")
    hook(emu, project_id, receiver.url)
    runner = new_runner(emu)
    pipeline_id = emu.create_pipeline(
        project_id, [JobSpec("compile", stage="build"), JobSpec("bundle", stage="build"), JobSpec("unit")]
    )
    created = hooks_of(emu, receiver)

    # when the first build job finishes
    compile_, bundle = request_job(emu, runner["token"]).json(), request_job(emu, runner["token"]).json()
    report(emu, compile_, "success")
    halfway = statuses(emu, project_id, pipeline_id)
    halfway_hooks = hooks_of(emu, receiver)
    # and then the second
    report(emu, bundle, "success")

    # then
    assert created == sorted(
        [
            ("compile", "created"),
            ("bundle", "created"),
            ("unit", "created"),
            ("compile", "pending"),
            ("bundle", "pending"),
        ]
    )
    assert halfway == {"compile": "success", "bundle": "running", "unit": "created"}
    assert ("unit", "pending") not in halfway_hooks
    assert request_job(emu, runner["token"]).json()["job_info"]["name"] == "unit"  # pending once build was done
    assert [s for name, s in hooks_of(emu, receiver) if name == "unit"] == ["created", "pending", "running"]
    assert gl.projects.get(project_id, lazy=True).pipelines.get(pipeline_id).status == "running"


def test_a_pipeline_is_pending_while_only_its_first_stage_is_queued(emu: GitLabEmulator, gl: gitlab.Gitlab) -> None:
    """The pipeline's status is the composite of its jobs: pending and created jobs together are ``pending``, and
    a finished job beside created ones is ``running`` (lib/gitlab/ci/status/composite.rb)."""
    # given
    project = gl.projects.get(emu.create_project("acme/app"))

    # when
    pipeline = project.pipelines.create(
        {"ref": "main", "jobs": [{"name": "compile", "stage": "build"}, {"name": "unit", "stage": "test"}]}
    )
    pending = project.pipelines.get(pipeline.id).status
    emu.set_job_status(project.id, job_id(emu, project.id, pipeline.id, "compile"), "success")
    second_stage_queued = project.pipelines.get(pipeline.id).status
    emu.set_job_status(project.id, job_id(emu, project.id, pipeline.id, "unit"), "success")

    # then
    assert (pipeline.status, pending, second_stage_queued) == ("pending", "pending", "running")
    assert project.pipelines.get(pipeline.id).status == "success"
    assert [j.status for j in project.jobs.list(scope="created", get_all=True)] == []


def test_a_failed_stage_skips_later_jobs_without_job_hooks_but_runs_on_failure_and_always_jobs(
    emu: GitLabEmulator, receiver: Receiver
) -> None:
    """After a failure, ``when: on_success`` jobs of later stages are skipped and ``on_failure`` and ``always``
    jobs run (app/services/ci/process_build_service.rb ``valid_statuses_for_build``); skipping sends no Job Hook
    (app/models/ci/build.rb executes hooks on creation, on pending, on pending to running and, through
    app/workers/ci/build_finished_worker.rb, on success, failed and canceled only)."""
    # given
    project_id = emu.create_project("acme/app")
    hook(emu, project_id, receiver.url)
    pipeline_id = emu.create_pipeline(
        project_id,
        [
            JobSpec("compile", stage="build"),
            JobSpec("unit", stage="test"),
            JobSpec("report", stage="test", when=When.ON_FAILURE),
            JobSpec("ship", stage="deploy"),
            JobSpec("cleanup", stage="deploy", when=When.ALWAYS),
        ],
    )

    # when
    emu.set_job_status(project_id, job_id(emu, project_id, pipeline_id, "compile"), "failed")

    # then
    assert statuses(emu, project_id, pipeline_id) == {
        "compile": "failed",
        "unit": "skipped",
        "report": "pending",
        "ship": "created",
        "cleanup": "created",
    }
    emu.set_job_status(project_id, job_id(emu, project_id, pipeline_id, "report"), "success")
    assert statuses(emu, project_id, pipeline_id)["ship"] == "skipped"
    assert statuses(emu, project_id, pipeline_id)["cleanup"] == "pending"
    after_creation = [s for name, s in hooks_of(emu, receiver) if name in {"unit", "ship"}]
    assert after_creation == ["created", "created"]  # no hook for skipped
    assert emu.job(project_id, job_id(emu, project_id, pipeline_id, "unit"))["pipeline"]["status"] == "running"


def test_a_job_allowed_to_fail_lets_the_next_stage_run(emu: GitLabEmulator, gl: gitlab.Gitlab) -> None:
    """A failed job with ``allow_failure`` counts as a success with warnings for the stages after it and for the
    pipeline (lib/gitlab/ci/status/composite.rb, ``success_with_warnings``)."""
    # given
    project_id = emu.create_project("acme/app")
    pipeline_id = emu.create_pipeline(
        project_id, [JobSpec("lint", stage="build", allow_failure=True), JobSpec("unit", stage="test")]
    )

    # when
    emu.set_job_status(project_id, job_id(emu, project_id, pipeline_id, "lint"), "failed")
    queued = statuses(emu, project_id, pipeline_id)["unit"]
    emu.set_job_status(project_id, job_id(emu, project_id, pipeline_id, "unit"), "success")

    # then
    assert queued == "pending"
    assert gl.projects.get(project_id, lazy=True).pipelines.get(pipeline_id).status == "success"


def test_stages_run_in_the_listed_order_and_an_unknown_stage_refuses_the_pipeline(emu: GitLabEmulator) -> None:
    """Stages run in the order ``stages:`` lists them (GitLab's default ``build``, ``test``, ``deploy`` without
    one, wrapped in ``.pre`` and ``.post``); a job naming another stage fails the pipeline's creation with the
    YAML processor's error (https://docs.gitlab.com/ci/yaml/#stages, lib/gitlab/ci/yaml_processor.rb
    ``validate_job_stage!``)."""
    # given
    project_id = emu.create_project("acme/app")

    # when
    listed = admin(
        emu,
        "POST",
        f"/projects/{project_id}/pipeline",
        json={
            "ref": "main",
            "stages": ["lint", "build"],
            "jobs": [{"name": "b", "stage": "build"}, {"name": "l", "stage": "lint"}],
        },
    )
    unknown = admin(
        emu, "POST", f"/projects/{project_id}/pipeline", json={"ref": "main", "jobs": [{"name": "e2e", "stage": "e2e"}]}
    )

    # then
    assert listed.status_code == 201, listed.text
    assert statuses(emu, project_id, listed.json()["id"]) == {"b": "created", "l": "pending"}
    assert unknown.status_code == 400
    assert unknown.json() == {
        "message": {
            "base": ["e2e job: chosen stage does not exist; available stages are .pre, build, test, deploy, .post"]
        }
    }


def test_retrying_a_failed_job_brings_back_the_jobs_it_skipped(emu: GitLabEmulator, gl: gitlab.Gitlab) -> None:
    """Retrying a job resets the skipped jobs after it to ``created``; they run once the new try succeeds
    (app/services/ci/retry_job_service.rb, Ci::ResetSkippedJobsService)."""
    # given
    project = gl.projects.get(emu.create_project("acme/app"))
    pipeline_id = emu.create_pipeline(project.id, [JobSpec("compile", stage="build"), JobSpec("unit")])
    emu.set_job_status(project.id, job_id(emu, project.id, pipeline_id, "compile"), "failed")
    skipped = statuses(emu, project.id, pipeline_id)["unit"]

    # when
    retried = project.jobs.get(job_id(emu, project.id, pipeline_id, "compile"), lazy=True).retry()
    waiting = statuses(emu, project.id, pipeline_id)["unit"]
    emu.set_job_status(project.id, int(retried["id"]), "success")

    # then
    assert (skipped, retried["status"], waiting) == ("skipped", "pending", "created")
    assert statuses(emu, project.id, pipeline_id)["unit"] == "pending"


# -- Job Hook and jobs API shapes --


def test_build_failure_reason_is_unknown_failure_unless_the_job_failed_otherwise(
    emu: GitLabEmulator, gl: gitlab.Gitlab, receiver: Receiver
) -> None:
    """A Job Hook always carries ``build_failure_reason``, ``build.failure_reason`` (lib/gitlab/data_builder/
    build.rb): ``unknown_failure`` for a job that did not fail, created ones included, never null, since the enum
    maps NULL to it (app/models/concerns/enums/ci/commit_status.rb ``unknown_failure: nil``, read through
    app/models/commit_status.rb ``enum failure_reason:``; the "created" example of
    doc/user/project/integrations/webhook_events.md; gitlab-org/gitlab#214465). A runner's reason outside the
    enum is stored as ``unknown_failure`` (spec/requests/api/ci/runner/jobs_put_spec.rb). The jobs API shows
    ``failure_reason`` only on a failed job (lib/api/entities/ci/job_basic.rb)."""
    # given
    project = gl.projects.get(emu.create_project("acme/app"))
    hook(emu, project.id, receiver.url)
    runner = new_runner(emu)
    emu.create_pipeline(project.id, [JobSpec("ok"), JobSpec("broken"), JobSpec("odd")])
    ok, broken, odd = (request_job(emu, runner["token"]).json() for _ in range(3))

    # when
    report(emu, ok, "success")
    report(emu, broken, "failed", failure_reason="script_failure")
    report(emu, odd, "failed", failure_reason="cosmic_rays")
    emu.wait_for_deliveries(timeout=5)

    # then
    reasons = {(b["build_name"], b["build_status"]): b["build_failure_reason"] for b in receiver.bodies()}
    assert {k: v for k, v in reasons.items() if k[1] != "failed"} == {
        (name, status): "unknown_failure"
        for name in ("ok", "broken", "odd")
        for status in ("created", "pending", "running")
    } | {("ok", "success"): "unknown_failure"}
    assert (reasons[("broken", "failed")], reasons[("odd", "failed")]) == ("script_failure", "unknown_failure")
    assert "failure_reason" not in project.jobs.get(ok["id"]).attributes
    assert project.jobs.get(broken["id"]).failure_reason == "script_failure"


def test_a_created_job_hook_can_arrive_after_the_jobs_later_hooks(
    emulator_factory: Callable[..., GitLabEmulator], receiver: Receiver
) -> None:
    """GitLab executes a build's hooks from Sidekiq (``build.execute_hooks``, app/models/ci/build.rb; each hook
    through WebHookWorker), so nothing orders the executions of one job's events: with ``created_hook_delay`` the
    "created" execution lands after "pending", "running" and "success", still carrying the job as it was at
    creation."""
    # given
    emu = emulator_factory(created_hook_delay=1.5)
    project_id = emu.create_project("acme/app")
    hook(emu, project_id, receiver.url)
    emu.create_pipeline(project_id, [JobSpec("build")])

    # when the job runs to success at once
    job = request_job(emu, new_runner(emu)["token"]).json()
    report(emu, job, "success")
    emu.wait_for_deliveries(timeout=10)

    # then
    *earlier, last = receiver.bodies()
    assert sorted(b["build_status"] for b in earlier) == ["pending", "running", "success"]
    assert (last["build_status"], last["build_failure_reason"], last["runner"]) == ("created", "unknown_failure", None)
    assert last["build_started_at"] is None and last["commit"]["status"] == "created"


def test_the_created_hook_delay_can_be_changed_while_the_emulator_runs(emu: GitLabEmulator, receiver: Receiver) -> None:
    """``set_created_hook_delay`` holds back the "created" executions of jobs created from then on, and 0 stops
    holding them back; the other events are never held."""
    # given
    project_id = emu.create_project("acme/app")
    hook(emu, project_id, receiver.url)
    emu.set_created_hook_delay(1.5)

    # when
    emu.create_pipeline(project_id, [JobSpec("held")])
    pending_first = wait_for_bodies(receiver, 1)
    emu.wait_for_deliveries(timeout=10)
    emu.set_created_hook_delay(0)
    started = time.monotonic()
    emu.create_pipeline(project_id, [JobSpec("prompt")])
    emu.wait_for_deliveries(timeout=10)

    # then
    assert [(b["build_name"], b["build_status"]) for b in pending_first] == [("held", "pending")]
    assert ("held", "created") in hooks_of(emu, receiver)
    assert ("prompt", "created") in hooks_of(emu, receiver) and time.monotonic() - started < 1.0


def wait_for_bodies(receiver: Receiver, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(receiver.received) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return receiver.bodies()


# -- the runner's job API --


def test_a_job_update_for_an_unknown_or_finished_job_is_a_403(emu: GitLabEmulator) -> None:
    """``PUT /jobs/:id`` answers 403, never 404, for a job that does not exist or whose token is gone, so that
    gitlab-runner stops working on it (lib/api/ci/helpers/runner.rb ``authenticate_job!``); a state the runner
    may not report is a 400 (app/services/ci/update_build_state_service.rb); a success is a 200 with the job's
    status in ``Job-Status`` (spec/requests/api/ci/runner/jobs_put_spec.rb)."""
    # given
    project_id = emu.create_project("acme/app")
    emu.create_pipeline(project_id, [JobSpec("build")])
    job = request_job(emu, new_runner(emu)["token"]).json()

    # when
    unknown = requests.put(api(emu, "/jobs/99999999"), json={"token": job["token"], "state": "success"}, timeout=5)
    canceled_by_runner = report(emu, job, "canceled")
    still_running = report(emu, job, "running")
    done = report(emu, job, "success")
    after = report(emu, job, "failed")

    # then
    assert (unknown.status_code, unknown.json()) == (403, {"message": "403 Forbidden"})
    assert canceled_by_runner.status_code == 400
    assert (still_running.status_code, still_running.headers["Job-Status"]) == (200, "running")
    assert (done.status_code, done.headers["Job-Status"]) == (200, "success")
    assert after.status_code == 403
    assert emu.job(project_id, job["id"])["status"] == "success"


def test_a_job_being_canceled_tells_the_runner_through_job_status(emu: GitLabEmulator) -> None:
    """A job the user cancels while it runs is ``canceling``: the runner's updates still succeed and carry
    ``Job-Status: canceling``; once it is no longer processing on the runner, updates are 403s
    (lib/api/ci/helpers/runner.rb ``processing_on_runner?``, spec/requests/api/ci/runner/jobs_put_spec.rb)."""
    # given
    project_id = emu.create_project("acme/app")
    emu.create_pipeline(project_id, [JobSpec("build")])
    job = request_job(emu, new_runner(emu)["token"]).json()

    # when
    emu.set_job_status(project_id, job["id"], "canceling")
    answer = report(emu, job, "running")
    trace = patch_trace(emu, job, b"stopping\n", "0-8")

    # then
    assert (answer.status_code, answer.headers["Job-Status"]) == (200, "canceling")
    assert (trace.status_code, trace.headers["Job-Status"]) == (202, "canceling")


def test_the_trace_is_appended_as_gitlab_runner_sends_it(emu: GitLabEmulator) -> None:
    """``PATCH /jobs/:id/trace`` appends the body where ``Content-Range`` starts and answers 202 with
    ``Range: 0-<size>``, ``Job-Status`` and ``X-GitLab-Trace-Update-Interval``; a start other than the stored
    size is a 416 with the size GitLab has, a missing header a 400, an unknown job a 403 (lib/api/ci/runner.rb
    ``patch '/:id/trace'``, app/services/ci/append_build_trace_service.rb,
    spec/requests/api/ci/runner/jobs_trace_spec.rb)."""
    # given
    project_id = emu.create_project("acme/app")
    emu.create_pipeline(project_id, [JobSpec("build")])
    job = request_job(emu, new_runner(emu)["token"]).json()

    # when
    first = patch_trace(emu, job, b"Running with gitlab-runner\n", "0-26")
    second = patch_trace(emu, job, b"$ make\n", "27-33")
    gap = patch_trace(emu, job, b"lost\n", "40-44")
    overlap = patch_trace(emu, job, b"$ make\n", "27-33")
    no_range = patch_trace(emu, job, b"x", None)
    unknown = requests.patch(
        api(emu, "/jobs/99999999/trace"),
        data=b"x",
        headers={"JOB-TOKEN": job["token"], "Content-Range": "0-0"},
        timeout=5,
    )

    # then
    assert first.status_code == 202
    assert {k: first.headers[k] for k in ("Range", "Job-Status", "X-GitLab-Trace-Update-Interval")} == {
        "Range": "0-27",
        "Job-Status": "running",
        "X-GitLab-Trace-Update-Interval": "60",
    }
    assert (second.status_code, second.headers["Range"]) == (202, "0-34")
    assert (gap.status_code, gap.headers["Range"], gap.json()) == (
        416,
        "0-34",
        {"message": "416 Range Not Satisfiable"},
    )
    assert (overlap.status_code, overlap.headers["Range"]) == (416, "0-34")
    assert (no_range.status_code, no_range.json()) == (400, {"message": "400 Missing header Content-Range"})
    assert unknown.status_code == 403
    assert emu.job_trace(project_id, job["id"]) == b"Running with gitlab-runner\n$ make\n"
