"""A pipeline of several stages through the whole fleet: GitLab queues a stage only once the one before it is
done, so the fleet sees its jobs one stage at a time (the sequential case)."""

from __future__ import annotations

from typing import Any

import requests

from tests.integration.test_scale_up import Fleet, fleet

__all__ = ["fleet"]  # the fixture, shared with the scale-up suite


def take_job(fleet: Fleet, instance_id: str) -> dict[str, Any]:
    """The runner on ``instance_id`` asks GitLab for a job of this test's project with the token the fleet gave
    it, as gitlab-runner does. The session's GitLab still holds earlier tests' pending jobs, which an instance
    runner may be handed first: those it just keeps."""
    token = fleet.token_of(instance_id)["token"]
    while True:
        answer = requests.post(
            f"{fleet.gitlab.url}/api/v4/jobs/request",
            json={"token": token, "system_id": "s_" + instance_id},
            timeout=10,
        )
        assert answer.status_code == 201, answer.text
        job = dict(answer.json())
        if job["job_info"]["project_id"] == fleet.sandbox.project_id:
            return job


def test_a_later_stage_is_queued_and_launched_only_once_the_earlier_stage_finished(fleet: Fleet) -> None:
    # given a build job and a test job after it, both for the docker pool
    specs = [
        {"name": "compile", "stage": "build", "tags": ["docker"]},
        {"name": "unit", "stage": "test", "tags": ["docker"]},
    ]
    pipeline_id = fleet.gitlab.create_pipeline(fleet.sandbox.project_id, specs)
    fleet.gitlab.wait_for_deliveries(timeout=30)
    compile_id, unit_id = (int(j["id"]) for j in fleet.gitlab.jobs_of_pipeline(fleet.sandbox.project_id, pipeline_id))

    # when the fleet handles what GitLab sent
    fleet.run()

    # then only the build job got a runner; the test job is known but waits, as GitLab has it
    first = fleet.instances("docker")
    assert len(first) == 1 and fleet.leases("docker") == 1
    assert fleet.job(compile_id).get("launch_id")
    assert (fleet.job(unit_id)["status"], fleet.job(unit_id).get("launch_id")) == ("created", None)

    # when that runner runs the build job to success
    job = take_job(fleet, first[0]["InstanceId"])
    answer = requests.put(
        f"{fleet.gitlab.url}/api/v4/jobs/{job['id']}", json={"token": job["token"], "state": "success"}, timeout=10
    )
    fleet.gitlab.wait_for_deliveries(timeout=30)
    fleet.run(until=lambda: bool(fleet.job(unit_id).get("launch_id")))

    # then the test job became pending in GitLab, was queued, and got a runner of its own
    assert (job["id"], answer.status_code) == (compile_id, 200)
    assert fleet.gitlab.job(fleet.sandbox.project_id, unit_id)["status"] == "pending"
    assert fleet.job(compile_id)["status"] == "success"
    assert fleet.job(unit_id)["status"] == "pending"
    assert len(fleet.instances("docker")) == 2
    assert fleet.dead_letters() == []


def test_a_job_gitlab_skips_is_never_queued_and_its_record_expires(fleet: Fleet) -> None:
    # given a build job and a test job after it
    from chalicelib.store import UNFINISHED_JOB_TTL_SECONDS

    specs = [{"name": "compile", "stage": "build", "tags": ["docker"]}, {"name": "unit", "stage": "test", "tags": []}]
    pipeline_id = fleet.gitlab.create_pipeline(fleet.sandbox.project_id, specs)
    fleet.gitlab.wait_for_deliveries(timeout=30)
    compile_id, unit_id = (int(j["id"]) for j in fleet.gitlab.jobs_of_pipeline(fleet.sandbox.project_id, pipeline_id))
    fleet.run()

    # when the build job fails, GitLab skips the test job and tells no one (skipping sends no Job Hook)
    fleet.gitlab.set_job_status(fleet.sandbox.project_id, compile_id, "failed", failure_reason="script_failure")
    fleet.gitlab.wait_for_deliveries(timeout=30)
    fleet.run()

    # then the test job got no runner and nothing waits for it; its record, stuck at created, still goes away
    assert fleet.gitlab.job(fleet.sandbox.project_id, unit_id)["status"] == "skipped"
    assert len(fleet.instances("docker")) == 1
    record = fleet.job(unit_id)
    assert (record["status"], record.get("launch_id")) == ("created", None)
    assert 0 < int(record["ttl"]) - int(record["updated_at"]) <= UNFINISHED_JOB_TTL_SECONDS
    assert fleet.job(compile_id)["failure_reason"] == "script_failure"
    assert fleet.take_queued(0, timeout=0.5) == []
