"""Scale-up on moto server and the GitLab emulator, with faults injected at the wire.

EC2 faults go through ``tests.faults.WireFaults`` (real botocore, real AWS error bodies, moto behind); GitLab
faults through the emulator's ``fail_next`` (real HTTP answers). Each test asserts what an operator would see:
instances in EC2, runners in GitLab, tokens in SSM, capacity counters, and where every job ended up.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import requests

from chalicelib.config import FleetConfig
from chalicelib.errors import RetryableError
from chalicelib.jobs_queue import QueuedJob
from chalicelib.naming import POOL_TAG, runner_description, runner_role_name
from chalicelib.observability import metrics
from chalicelib.scaling.tokens import session_user_id
from chalicelib.store import job_key, launch_key, pool_key, runner_key, token_key
from fleetctl.sandbox.ec2_events import state_change_entry, terminate_instances
from tests.faults import SimulatedCrash, WireFaults

ACCOUNT = "123456789012"


class Fleet:
    """The sandbox, seen the way an operator (and the tests) look at it."""

    def __init__(self, sandbox: Any) -> None:
        from chalicelib import runtime

        self.sandbox = sandbox
        self.gitlab = sandbox.gitlab
        self.runtime = runtime
        self.config: FleetConfig = sandbox.config
        self.ec2 = runtime.aws().ec2
        # The GitLab emulator lives for the whole session: only runners made during this test count.
        self._earlier_runners = {int(r["id"]) for r in sandbox.gitlab.runners()}
        self._earlier_calls = sandbox.gitlab.calls

    # -- driving ----------------------------------------------------------------------------------------------

    def pipeline(self, *tag_lists: list[str]) -> list[int]:
        """A pipeline with one job per tag list; returns once GitLab delivered its Job Hooks (jobs queued)."""
        specs = [{"name": f"job-{i}", "stage": "test", "tags": tags} for i, tags in enumerate(tag_lists)]
        pipeline_id = self.gitlab.create_pipeline(self.sandbox.project_id, specs)
        self.gitlab.wait_for_deliveries(timeout=30)
        return [int(j["id"]) for j in self.gitlab.jobs_of_pipeline(self.sandbox.project_id, pipeline_id)]

    def run(self, until: Callable[[], bool] | None = None, timeout: float = 30.0) -> None:
        """Let the event pump deliver queued jobs and events, as Lambda would, until idle (or ``until``). Idle means
        the local AWS has settled too: no EC2 state-change event still due, no read still lagging a write."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sandbox.pump.drain(timeout=max(1.0, deadline - time.monotonic()))
            self.sandbox.aws.settle()
            if self.sandbox.pump.drain(timeout=max(1.0, deadline - time.monotonic())):
                continue
            if until is None or until():
                return
            time.sleep(0.3)
        if until is not None:
            assert until(), "the fleet did not get there in time"

    def scale_up(self, config: FleetConfig | None = None, clock: Callable[[], float] | None = None) -> Any:
        """A scale-up service built like the Lambda's, with another config or clock where a test needs one."""
        from chalicelib.scaling.policy import RetryPolicy
        from chalicelib.scaling.scale_up import build_scale_up

        rt = self.runtime
        return build_scale_up(
            config or self.config,
            rt.aws(),
            rt.gitlab_api(),
            policy=RetryPolicy(base_delay=1, lease_wait=1),
            **({"clock": clock} if clock else {}),
        )

    def take_queued(self, expected: int, timeout: float = 15.0) -> list[str]:
        """Consume ``expected`` message bodies from the jobs queue (waiting out their delays)."""
        return self._take(self.runtime.jobs_queue().url, expected, timeout)

    def dead_letters(self, expected: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        return [json.loads(b) for b in self._take(self.runtime.dead_letter_queue().url, expected, timeout)]

    def _take(self, url: str, expected: int, timeout: float) -> list[str]:
        sqs = self.runtime.aws().sqs
        bodies: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            wait = 0 if len(bodies) >= expected else 1
            found = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=wait)
            messages = found.get("Messages", [])
            for message in messages:
                bodies.append(message["Body"])
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            if not messages and len(bodies) >= expected:
                break
        return bodies

    # -- looking ----------------------------------------------------------------------------------------------

    def deliver_events(self) -> int:
        """EventBridge's events of what happened so far, delivered once EC2 put them (its state changes follow a
        call by a lag)."""
        self.sandbox.aws.settle()
        return int(self.sandbox.pump.pump_events())

    def instances(self, pool: str | None = None) -> list[dict[str, Any]]:
        """The fleet's pending and running instances, once the local AWS's reads caught up with the launches made
        so far (DescribeInstances lags behind a launch, as EC2's does)."""
        self.sandbox.aws.settle()
        filters = [
            {"Name": "tag:runner-fleet:fleet", "Values": [self.config.fleet]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
        if pool:
            filters.append({"Name": "tag:runner-fleet:pool", "Values": [pool]})
        found = []
        for page in self.ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    instance["tags"] = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                    found.append(instance)
        return found

    def gitlab_calls(self, method: str, route: str) -> int:
        """API calls GitLab received during this test, by route template ("POST /user/runners")."""
        return int(self.gitlab.calls[(method, route)] - self._earlier_calls[(method, route)])

    def gitlab_runners(self) -> list[dict[str, Any]]:
        return [r for r in self.gitlab.runners() if int(r["id"]) not in self._earlier_runners]

    def record(self, pk: str) -> dict[str, Any]:
        return self.runtime.store().get(pk) or {}

    def job(self, job_id: int) -> dict[str, Any]:
        return self.record(job_key(self.sandbox.project_id, job_id))

    def leases(self, pool: str) -> int:
        return int(self.record(pool_key(pool)).get("leases", 0))

    def runner_role_id(self, pool: str) -> str:
        iam = self.runtime.aws().client("iam")
        return str(iam.get_role(RoleName=runner_role_name(self.config.fleet, pool))["Role"]["RoleId"])

    def token_key(self, instance_id: str) -> str:
        """Where the instance looks for its token: its role session's aws:userid, "<role id>:<instance id>", the
        role being its pool's (the instance's pool tag names the pool)."""
        [reservation] = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        tags = {tag["Key"]: tag["Value"] for tag in reservation["Instances"][0].get("Tags", [])}
        return token_key(session_user_id(self.runner_role_id(tags[POOL_TAG]), instance_id))

    def token_of(self, instance_id: str) -> dict[str, Any]:
        """The token item the instance would read (KeyError when there is none)."""
        found = self.record(self.token_key(instance_id))
        if not found:
            raise KeyError(f"no token for {instance_id}")
        return found

    def verify_runner_token(self, token: str) -> int:
        answer = requests.post(
            f"{self.gitlab.url}/api/v4/runners/verify", json={"token": token, "system_id": "s_test"}, timeout=10
        )
        return answer.status_code

    def instance_terminated(self, instance_id: str) -> str:
        """Terminate an instance in EC2 and hand its state-change event to the handler, as EventBridge would."""
        from chalicelib.lifecycle.instances import parse_state_change

        self.ec2.terminate_instances(InstanceIds=[instance_id])
        return str(self.runtime.instance_events().handle(parse_state_change(state_change(instance_id))))

    def token_exists(self, instance_id: str) -> bool:
        return bool(self.record(self.token_key(instance_id)))

    def with_pool(self, name: str, **changes: Any) -> FleetConfig:
        pools = tuple(p.model_copy(update=changes) if p.name == name else p for p in self.config.pools)
        return self.config.model_copy(update={"pools": pools})

    def assert_every_gitlab_runner_is_recorded(self) -> None:
        recorded = {
            int(r["gitlab_runner_id"])
            for r in self.runtime.store().scan("runner")
            if r.get("gitlab_runner_id") is not None
        }
        assert {int(r["id"]) for r in self.gitlab_runners()} <= recorded


def state_change(instance_id: str, state: str = "terminated") -> dict[str, Any]:
    """An "EC2 Instance State-change Notification" as EventBridge delivers it (the documented sample's shape)."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2",
        "account": ACCOUNT,
        "time": "2026-11-29T12:00:00Z",
        "region": "us-east-1",
        "resources": [f"arn:aws:ec2:us-east-1:{ACCOUNT}:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "state": state},
    }


@pytest.fixture
def fleet(fresh_sandbox: Any) -> Fleet:
    return Fleet(fresh_sandbox)


# -- the happy path ------------------------------------------------------------------------------------------------


def test_every_pending_job_gets_one_spot_runner_in_its_pool(fleet: Fleet) -> None:
    # given
    jobs = fleet.pipeline(["docker", "linux"], ["docker", "linux"], ["docker", "dind"], [])
    # when
    fleet.run()
    # then: the untagged job went to docker (run_untagged), the dind one to build
    docker, build = fleet.instances("docker"), fleet.instances("build")
    assert (len(docker), len(build)) == (3, 1)
    assert {i["InstanceLifecycle"] for i in docker + build} == {"spot"}
    assert {i["InstanceType"] for i in docker} <= set(fleet.config.pool("docker").instance_types)
    assert all(i["tags"]["runner-fleet:launch-id"] for i in docker + build)
    # one GitLab runner per instance, with the pool's tags, naming its instance
    runners = {r["description"]: r for r in fleet.gitlab_runners()}
    assert len(runners) == 4
    for instance in docker + build:
        pool = fleet.config.pool(instance["tags"]["runner-fleet:pool"])
        runner = runners[runner_description(fleet.config.fleet, pool.name, instance["InstanceId"])]
        assert sorted(runner["tag_list"]) == sorted(pool.tags)
        assert runner["run_untagged"] is pool.run_untagged
        assert runner["maximum_timeout"] == pool.job_timeout_seconds
        # its token: in the item keyed by the instance's own role session, and a token GitLab accepts
        token = fleet.token_of(instance["InstanceId"])
        assert fleet.verify_runner_token(token["token"]) == 200
        record = fleet.record(runner_key(instance["InstanceId"]))
        assert record["token_key"] == token["pk"] == fleet.token_key(instance["InstanceId"])
        assert (record["state"], record["gitlab_runner_id"], record["pool"]) == ("booting", runner["id"], pool.name)
    # capacity counted, every job launched once, nothing left waiting or dead
    assert (fleet.leases("docker"), fleet.leases("build")) == (3, 1)
    for job_id in jobs:
        assert fleet.record(launch_key(fleet.job(job_id)["launch_id"]))["state"] == "launched"
    assert fleet.take_queued(0, timeout=0.5) == []
    assert fleet.dead_letters() == []


def test_a_pool_limited_to_protected_branches_gets_runners_limited_to_them(fleet: Fleet) -> None:
    # given a pool whose runners may take only jobs of protected branches and tags
    from chalicelib.config import AccessLevel

    config = fleet.with_pool("docker", access_level=AccessLevel.REF_PROTECTED)
    fleet.pipeline(["docker"])
    # when
    report = fleet.scale_up(config).handle_messages(fleet.take_queued(1))
    # then its GitLab runner is created with that access level, and the default stays unprotected
    assert report.as_dict() == {"launched": 1}
    assert [r["access_level"] for r in fleet.gitlab_runners()] == ["ref_protected"]
    fleet.pipeline(["docker", "dind"])
    fleet.scale_up().handle_messages(fleet.take_queued(1))
    assert sorted(r["access_level"] for r in fleet.gitlab_runners()) == ["not_protected", "ref_protected"]


def test_a_rotated_gitlab_token_is_used_without_a_cold_start(fleet: Fleet) -> None:
    # given a scale-up that has already talked to GitLab with the current token
    from fleetctl.sandbox.stack import GITLAB_FLEET_SCOPES, GITLAB_FLEET_TOKEN

    fleet.pipeline(["docker"])
    fleet.scale_up().handle_messages(fleet.take_queued(1))
    # when the operator rotates the token: the new one in SSM, the old one revoked in GitLab
    rotated = "glpat-rotated-" + uuid.uuid4().hex
    fleet.gitlab.add_token(rotated, scopes=GITLAB_FLEET_SCOPES)
    fleet.runtime.aws().ssm.put_parameter(
        Name=fleet.config.gitlab.token_parameter, Value=rotated, Type="SecureString", Overwrite=True
    )
    fleet.gitlab.revoke_token(GITLAB_FLEET_TOKEN)
    try:
        fleet.pipeline(["docker"])
        report = fleet.scale_up().handle_messages(fleet.take_queued(1))
    finally:
        fleet.gitlab.add_token(GITLAB_FLEET_TOKEN, scopes=GITLAB_FLEET_SCOPES)
    # then the same process launches with the new token at once (a 401 makes it read past its cache)
    assert report.as_dict() == {"launched": 1}
    assert len(fleet.instances("docker")) == 2


def test_one_createfleet_call_serves_a_whole_batch(fleet: Fleet) -> None:
    with WireFaults(fleet.ec2) as faults:
        fleet.pipeline(*[["docker"]] * 12)
        fleet.run()
    assert len(fleet.instances("docker")) == 12
    assert len(faults.calls_to("CreateFleet")) == 1


def test_no_runner_token_reaches_the_logs(fleet: Fleet) -> None:
    from chalicelib.observability import logger

    # every record, at every level, through the same JSON formatter the Lambda uses
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logger.registered_formatter)
    std_logger = logging.getLogger(logger.name)
    std_logger.addHandler(handler)
    logger.setLevel("DEBUG")
    try:
        fleet.pipeline(["docker"], ["docker", "dind"])
        fleet.run()
    finally:
        logger.setLevel("WARNING")
        std_logger.removeHandler(handler)
    logs = stream.getvalue()
    assert "runner launched" in logs  # the logs were captured at all
    tokens = [fleet.token_of(i["InstanceId"])["token"] for i in fleet.instances()]
    assert len(tokens) == 2
    assert not [t for t in tokens if t in logs]
    assert "glrt-" not in logs


def test_a_job_no_pool_can_run_is_recorded_not_retried(fleet: Fleet) -> None:
    [job] = fleet.pipeline(["gpu"])
    fleet.run()
    assert fleet.instances() == []
    assert (fleet.job(job)["outcome"], fleet.job(job)["tags"]) == ("unmatched", ["gpu"])
    assert fleet.take_queued(0, timeout=2) == []
    assert fleet.dead_letters() == []


def test_a_job_cancelled_before_scale_up_launches_nothing(fleet: Fleet) -> None:
    [job] = fleet.pipeline(["docker"])
    fleet.gitlab.set_job_status(fleet.sandbox.project_id, job, "canceled")
    fleet.gitlab.wait_for_deliveries()

    fleet.run()

    assert fleet.instances() == []
    assert fleet.job(job)["outcome"] == "not_pending"
    assert fleet.job(job)["gitlab_status"] == "canceled"
    assert fleet.leases("docker") == 0


# -- EC2 capacity and throttling -------------------------------------------------------------------------------------


def test_partial_spot_capacity_is_topped_up_on_demand(fleet: Fleet) -> None:
    with WireFaults(fleet.ec2) as faults:
        faults.capacity_shortage(["m7i.large"], unavailable=2)
        fleet.pipeline(*[["docker"]] * 5)
        fleet.run()
        requests_made = [c.params["TargetCapacitySpecification"] for c in faults.calls_to("CreateFleet")]

    lifecycles = Counter(i.get("InstanceLifecycle", "on-demand") for i in fleet.instances("docker"))
    assert lifecycles == {"spot": 3, "on-demand": 2}
    assert [r["TotalTargetCapacity"] for r in requests_made] == [5, 2]
    assert [r["DefaultTargetCapacityType"] for r in requests_made] == ["spot", "on-demand"]
    assert len(fleet.gitlab_runners()) == 5
    assert fleet.leases("docker") == 5


def test_no_spot_capacity_and_no_fallback_requeues_the_jobs(fleet: Fleet) -> None:
    # given a pool that must stay on spot, and no spot capacity anywhere
    config = fleet.with_pool("docker", on_demand_fallback=False)
    jobs = fleet.pipeline(["docker"], ["docker"])
    bodies = fleet.take_queued(2)
    with WireFaults(fleet.ec2) as faults:
        faults.capacity_shortage(None)
        # when
        report = fleet.scale_up(config).handle_messages(bodies)
    # then: nothing launched, capacity given back, both jobs back on the queue for a later attempt
    assert report.as_dict() == {"retried": 2}
    assert fleet.instances() == []
    assert fleet.leases("docker") == 0
    retried = [QueuedJob.from_json(b) for b in fleet.take_queued(2)]
    assert sorted(j.job_id for j in retried) == sorted(jobs)
    assert {j.attempt for j in retried} == {2}
    assert all("InsufficientInstanceCapacity" in j.last_error for j in retried)
    assert all("launch_id" not in fleet.job(j) for j in jobs)  # claims released: a later attempt can launch


def test_throttled_createfleet_is_retried_without_a_second_fleet(fleet: Fleet) -> None:
    with WireFaults(fleet.ec2) as faults:
        faults.fail("CreateFleet", "RequestLimitExceeded", times=2)
        fleet.pipeline(*[["docker"]] * 3)
        fleet.run()
    assert len(fleet.instances("docker")) == 3
    assert len(faults.calls_to("CreateFleet")) == 1
    assert faults.attempts("CreateFleet") == 3


def test_createfleet_throttled_throughout_requeues_then_dead_letters_with_the_reason(fleet: Fleet) -> None:
    config = fleet.with_pool("docker", max_launch_attempts=2)
    [job] = fleet.pipeline(["docker"])
    with WireFaults(fleet.ec2) as faults:
        faults.fail("CreateFleet", "RequestLimitExceeded", times=None)
        first = fleet.scale_up(config).handle_messages(fleet.take_queued(1))
        second = fleet.scale_up(config).handle_messages(fleet.take_queued(1))

    assert (first.as_dict(), second.as_dict()) == ({"retried": 1}, {"dead_lettered": 1})
    assert fleet.instances() == []
    assert fleet.leases("docker") == 0
    [dead] = fleet.dead_letters(1)
    assert (dead["job_id"], dead["attempt"]) == (job, 2)
    assert "RequestLimitExceeded" in dead["last_error"]
    assert fleet.job(job)["outcome"] == "dead_lettered"
    assert fleet.take_queued(0, timeout=2) == []


def test_a_crash_between_createfleet_and_the_state_write_adopts_the_instances(fleet: Fleet) -> None:
    # given a scale-up that dies right after CreateFleet answered
    jobs = fleet.pipeline(["docker"], ["docker"], ["docker"])
    bodies = fleet.take_queued(3)
    now = time.time()
    with WireFaults(fleet.ec2) as faults, pytest.raises(SimulatedCrash):
        faults.crash_after("CreateFleet")
        fleet.scale_up(clock=lambda: now).handle_messages(bodies)
    made = {i["InstanceId"] for i in fleet.instances("docker")}
    assert len(made) == 3
    assert fleet.gitlab_runners() == []
    # when SQS redelivers the batch after the Lambda's timeout
    with WireFaults(fleet.ec2) as faults:
        report = fleet.scale_up(clock=lambda: now + 300).handle_messages(bodies)
    # then the instances are adopted by their launch id, not launched again
    assert faults.calls_to("CreateFleet") == []
    assert {i["InstanceId"] for i in fleet.instances("docker")} == made
    assert report.as_dict() == {"launched": 3}
    runners = fleet.gitlab_runners()
    assert sorted(r["description"].rsplit(" ", 1)[1] for r in runners) == sorted(made)
    assert all(fleet.record(runner_key(i))["gitlab_runner_id"] for i in made)
    assert fleet.leases("docker") == 3
    assert {fleet.job(j)["launch_id"] for j in jobs} == {fleet.instances("docker")[0]["tags"]["runner-fleet:launch-id"]}


# -- GitLab outages ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 502, "delay": 6.0}], ids=["500", "timeout"])
def test_a_failed_job_read_is_retried(fleet: Fleet, fault: dict[str, Any]) -> None:
    jobs = fleet.pipeline(["docker"], ["docker"])
    fleet.gitlab.fail_next("GET", r"/projects/\d+/jobs/\d+", **fault)

    fleet.run(until=lambda: len(fleet.instances("docker")) == 2)

    assert len(fleet.gitlab_runners()) == 2
    assert all(fleet.record(launch_key(fleet.job(j)["launch_id"]))["state"] == "launched" for j in jobs)
    assert fleet.gitlab_calls("GET", "/projects/:id/jobs/:job_id") == 3


def test_a_failed_runner_creation_is_finished_by_the_retry(fleet: Fleet) -> None:
    fleet.gitlab.fail_next("POST", "/user/runners", status=500)
    fleet.pipeline(["docker"], ["docker"])

    fleet.run(until=lambda: len(fleet.gitlab_runners()) == 2)

    instances = fleet.instances("docker")
    assert len(instances) == 2
    assert fleet.gitlab_calls("POST", "/user/runners") == 3
    fleet.assert_every_gitlab_runner_is_recorded()
    for instance in instances:
        assert fleet.verify_runner_token(fleet.token_of(instance["InstanceId"])["token"]) == 200


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 502, "delay": 6.0}], ids=["500", "timeout"])
def test_a_runner_created_but_whose_answer_was_lost_is_found_not_duplicated(
    fleet: Fleet, fault: dict[str, Any]
) -> None:
    # GitLab creates the runner, but scale-up never hears of it
    fleet.gitlab.fail_next("POST", "/user/runners", after_processing=True, **fault)
    fleet.pipeline(["docker"])

    fleet.run(
        until=lambda: bool(fleet.instances())
        and "gitlab_runner_id" in fleet.record(runner_key(fleet.instances()[0]["InstanceId"]))
    )

    [instance] = fleet.instances("docker")
    [runner] = fleet.gitlab_runners()  # the one GitLab made first, not a second one
    assert runner["description"].endswith(instance["InstanceId"])
    fleet.assert_every_gitlab_runner_is_recorded()
    # its token was reset, so the one in SSM is the one GitLab accepts
    assert fleet.verify_runner_token(fleet.token_of(instance["InstanceId"])["token"]) == 200


# -- exactly once, within limits -------------------------------------------------------------------------------------


def test_the_same_job_queued_three_times_at_once_launches_once(fleet: Fleet) -> None:
    fleet.pipeline(["docker"])
    [body] = fleet.take_queued(1)
    scale_up = fleet.scale_up()
    threads = [threading.Thread(target=scale_up.handle_messages, args=([body],)) for _ in range(3)]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fleet.run()  # the copies that found the launch in progress come back, and find it done

    assert len(fleet.instances()) == 1
    assert len(fleet.gitlab_runners()) == 1
    assert fleet.leases("docker") == 1
    assert fleet.take_queued(0, timeout=3) == []


def test_a_claim_whose_answer_was_lost_is_still_ours_and_launches(fleet: Fleet) -> None:
    # the claim reaches DynamoDB, its answer times out, and botocore sends it again
    [job] = fleet.pipeline(["docker"])
    with WireFaults(fleet.runtime.aws().dynamodb) as faults:
        faults.lose_answer("UpdateItem")
        report = fleet.scale_up().handle_messages(fleet.take_queued(1))
    assert faults.attempts("UpdateItem") >= 2
    assert report.as_dict() == {"launched": 1}
    assert len(fleet.instances("docker")) == 1
    assert fleet.record(launch_key(fleet.job(job)["launch_id"]))["state"] == "launched"


def test_a_copy_arriving_between_anothers_claim_and_its_leases_does_not_launch_again(fleet: Fleet) -> None:
    # given another invocation that has just claimed the job and not yet taken its leases
    [job] = fleet.pipeline(["docker"])
    [body] = fleet.take_queued(1)
    now = time.time()
    fleet.runtime.store().claims.claim_job(fleet.sandbox.project_id, job, "launch-of-another-invocation", "docker")
    # when a copy of the job is handled meanwhile
    report = fleet.scale_up(clock=lambda: now + 1).handle_messages([body])
    # then it waits for that invocation instead of launching a second runner
    assert report.as_dict() == {"duplicate": 1}
    assert fleet.instances() == []
    assert fleet.job(job)["launch_id"] == "launch-of-another-invocation"
    # and once that claim has gone stale (its invocation died), the job is claimed afresh and launched
    later = fleet.scale_up(clock=lambda: now + 300).handle_messages(fleet.take_queued(1))
    assert later.as_dict() == {"launched": 1}
    assert len(fleet.instances("docker")) == 1


def test_a_full_pool_makes_jobs_wait_until_a_runner_finishes(fleet: Fleet) -> None:
    # given a pool of two runners, and three jobs
    config = fleet.with_pool("docker", max_runners=2)
    jobs = fleet.pipeline(["docker"], ["docker"], ["docker"])
    report = fleet.scale_up(config).handle_messages(fleet.take_queued(3))
    # then two launch and one waits, without spending an attempt
    assert report.as_dict() == {"launched": 2, "waiting": 1}
    assert len(fleet.instances("docker")) == 2
    assert fleet.leases("docker") == 2
    [waiting] = [QueuedJob.from_json(b) for b in fleet.take_queued(1)]
    assert (waiting.waits, waiting.attempt, waiting.pool, waiting.tags) == (1, 1, "docker", ("docker",))
    assert "launch_id" not in fleet.job(waiting.job_id)
    # while the pool stays full, its turns cost no GitLab call
    reads = fleet.gitlab_calls("GET", "/projects/:id/jobs/:job_id")
    assert fleet.scale_up(config).handle([waiting]).as_dict() == {"waiting": 1}
    [waiting] = [QueuedJob.from_json(b) for b in fleet.take_queued(1)]
    assert waiting.waits == 2
    # when a runner finishes (its instance terminates)
    finished = fleet.instances("docker")[0]["InstanceId"]
    terminate_instances(fleet.ec2, [finished])
    fleet.deliver_events()
    # then its capacity comes back, and the waiting job launches
    assert fleet.leases("docker") == 1
    assert fleet.record(runner_key(finished))["state"] == "terminated"
    assert fleet.scale_up(config).handle([waiting]).as_dict() == {"launched": 1}
    assert fleet.gitlab_calls("GET", "/projects/:id/jobs/:job_id") == reads
    assert len(fleet.instances("docker")) == 2
    assert fleet.leases("docker") == 2
    assert sorted(jobs) == sorted(j for j in jobs if fleet.job(j).get("launch_id"))


def test_a_job_cancelled_while_it_waited_is_not_launched(fleet: Fleet) -> None:
    config = fleet.with_pool("docker", max_runners=1)
    jobs = fleet.pipeline(["docker"], ["docker"])
    assert fleet.scale_up(config).handle_messages(fleet.take_queued(2)).as_dict() == {"launched": 1, "waiting": 1}
    [waiting] = [QueuedJob.from_json(b) for b in fleet.take_queued(1)]
    [launched] = [j for j in jobs if j != waiting.job_id]
    # the waiting job is cancelled (GitLab tells us by webhook) and then capacity frees up
    fleet.gitlab.set_job_status(fleet.sandbox.project_id, waiting.job_id, "canceled")
    fleet.gitlab.wait_for_deliveries()
    terminate_instances(fleet.ec2, [fleet.instances("docker")[0]["InstanceId"]])
    fleet.deliver_events()

    report = fleet.scale_up(config).handle([waiting])

    assert report.as_dict() == {"not_pending": 1}
    assert fleet.instances("docker") == []
    assert fleet.leases("docker") == 0
    assert fleet.job(waiting.job_id)["outcome"] == "not_pending"
    assert fleet.job(launched)["launch_id"]


def test_a_terminated_runner_returns_its_lease_once_and_leaves_gitlab(fleet: Fleet) -> None:
    fleet.pipeline(["docker"], ["docker"])
    fleet.run()
    victim = fleet.instances("docker")[0]["InstanceId"]
    events = fleet.runtime.aws().client("events")

    terminate_instances(fleet.ec2, [victim])
    # and EventBridge delivering its terminated event a second time
    events.put_events(Entries=[state_change_entry(victim, "terminated", "us-east-1")])
    fleet.run()

    assert fleet.leases("docker") == 1
    assert [r["description"] for r in fleet.gitlab_runners() if victim in r["description"]] == []
    assert not fleet.token_exists(victim)


def test_a_non_admin_token_with_exactly_the_documented_scopes_runs_launch_and_termination(fleet: Fleet) -> None:
    """docs/gitlab.md's scopes (read_api, create_runner, manage_runner) on a group Owner's token, no administrator:
    GitLab answers 403 insufficient_scope to anything else (lib/api/api_guard.rb), and /runners/all is for
    administrators only (doc/api/runners.md). (The sandbox's own token also has api, which only retrying jobs
    lost to spot interruptions needs: it is swapped for one without here.)"""
    from fleetctl.sandbox.stack import GITLAB_FLEET_SCOPES, GITLAB_FLEET_TOKEN

    # given a token with exactly those scopes in SSM, where scale-up reads it (the old one revoked, as a rotation)
    narrow = "glpat-narrow-" + uuid.uuid4().hex
    fleet.gitlab.add_token(narrow, scopes=("read_api", "create_runner", "manage_runner"))
    ssm = fleet.runtime.aws().ssm
    ssm.put_parameter(Name=fleet.config.gitlab.token_parameter, Value=narrow, Type="SecureString", Overwrite=True)
    fleet.gitlab.revoke_token(GITLAB_FLEET_TOKEN)
    try:
        stored = ssm.get_parameter(Name=fleet.config.gitlab.token_parameter, WithDecryption=True)["Parameter"]
        self_info = requests.get(
            f"{fleet.gitlab.url}/api/v4/personal_access_tokens/self",
            headers={"PRIVATE-TOKEN": stored["Value"]},
            timeout=10,
        ).json()
        assert sorted(self_info["scopes"]) == ["create_runner", "manage_runner", "read_api"]
        assert fleet.gitlab.job(fleet.sandbox.project_id, fleet.pipeline(["docker"])[0])["status"] == "pending"
        # when a job launches a runner, and a runner whose creation answer was lost is recovered, and both terminate
        fleet.gitlab.fail_next("POST", r"/user/runners", status=502, after_processing=True)
        fleet.run(
            until=lambda: bool(fleet.instances("docker"))
            and "gitlab_runner_id" in fleet.record(runner_key(fleet.instances("docker")[0]["InstanceId"]))
        )
        victim = fleet.instances("docker")[0]["InstanceId"]
        terminate_instances(fleet.ec2, [victim])
        fleet.run()
    finally:
        fleet.gitlab.add_token(GITLAB_FLEET_TOKEN, scopes=GITLAB_FLEET_SCOPES)
    # then every step succeeded with that token: launched, recorded, and gone from GitLab again
    assert fleet.record(runner_key(victim))["state"] == "terminated"
    assert fleet.gitlab_runners() == []
    assert fleet.leases("docker") == 0
    assert fleet.gitlab_calls("GET", "/runners/all") == 0
    assert fleet.gitlab_calls("GET", "/groups/:id/runners") >= 1


def test_a_malformed_message_is_dead_lettered_with_its_reason(fleet: Fleet) -> None:
    fleet.runtime.jobs_queue().send_raw("this is not a job")

    fleet.run()

    [dead] = fleet.dead_letters(1)
    assert dead["body"] == "this is not a job"
    assert dead["last_error"].startswith("malformed message")


# -- launches EC2 refuses for good ------------------------------------------------------------------------------------


def _launches(fleet: Fleet) -> list[dict[str, Any]]:
    return list(fleet.runtime.store().scan("launch"))


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("UnauthorizedOperation", 403),
        ("InvalidLaunchTemplateName.NotFoundException", 400),
        ("InvalidLaunchTemplateId.Malformed", 400),
        ("Unsupported", 400),
        ("InvalidParameterValue", 400),
    ],
)
def test_a_refused_launch_gives_capacity_back_and_dead_letters_its_jobs(fleet: Fleet, code: str, status: int) -> None:
    # given two jobs, and EC2 refusing every CreateFleet for a reason no retry fixes
    jobs = fleet.pipeline(["docker"], ["docker"])
    bodies = fleet.take_queued(2)
    with WireFaults(fleet.ec2) as faults:
        faults.fail("CreateFleet", code, status=status)
        # when the batch is handled, and then delivered a second time
        metrics.clear_metrics()
        first = fleet.scale_up().handle_messages(bodies)
        counted = {name: sum(metric["Value"]) for name, metric in metrics.metric_set.items()}
        second = fleet.scale_up().handle_messages(bodies)
    # then the capacity is back, nothing runs, and the jobs are dead-lettered with the code, once
    assert first.as_dict() == {"dead_lettered": 2}
    assert (counted[f"LaunchError.{code}"], counted["JobsDeadLettered"]) == (1, 2)
    assert second.as_dict() == {"duplicate": 2}
    assert len(faults.calls_to("CreateFleet")) == 1
    assert fleet.instances() == []
    assert fleet.leases("docker") == 0
    for job_id in jobs:
        item = fleet.job(job_id)
        assert "launch_id" not in item
        assert (item["outcome"], item["error_code"]) == ("dead_lettered", code)
    dead = fleet.dead_letters(2)
    assert sorted(d["job_id"] for d in dead) == sorted(jobs)
    assert all(code in d["last_error"] for d in dead)
    [launch] = _launches(fleet)
    assert (launch["state"], launch["reason"], launch["leases"]) == ("failed", code, 0)
    assert fleet.take_queued(0, timeout=1) == []


def test_a_resumed_launch_that_ec2_refuses_gives_its_leases_back(fleet: Fleet) -> None:
    # given a scale-up that died after taking its leases, before CreateFleet
    jobs = fleet.pipeline(["docker"], ["docker"])
    bodies = fleet.take_queued(2)
    now = time.time()
    with WireFaults(fleet.runtime.aws().dynamodb) as faults, pytest.raises(SimulatedCrash):
        faults.crash_after("TransactWriteItems")
        fleet.scale_up(clock=lambda: now).handle_messages(bodies)
    assert fleet.leases("docker") == 2
    # when the batch comes back once the launch is stale, and EC2 now refuses the launch
    with WireFaults(fleet.ec2) as faults:
        faults.fail("CreateFleet", "UnauthorizedOperation", status=403)
        report = fleet.scale_up(clock=lambda: now + 300).handle_messages(bodies)
    # then
    assert report.as_dict() == {"dead_lettered": 2}
    assert fleet.leases("docker") == 0
    assert fleet.instances() == []
    assert all("launch_id" not in fleet.job(j) for j in jobs)
    assert all("UnauthorizedOperation" in d["last_error"] for d in fleet.dead_letters(2))


def test_a_refused_token_write_dead_letters_and_leaves_the_launch_for_the_reconciler(fleet: Fleet) -> None:
    # given DynamoDB refusing the runner tokens (the role lost dynamodb:PutItem on token items; scale-up's only
    # PutItem is the token's)
    jobs = fleet.pipeline(["docker"])
    bodies = fleet.take_queued(1)
    with WireFaults(fleet.runtime.aws().dynamodb) as faults:
        faults.fail("PutItem", "AccessDeniedException")
        # when
        report = fleet.scale_up().handle_messages(bodies)
    # then the job is dead-lettered with the code, no GitLab runner is left behind, and the launch record
    # says what went wrong and still holds nothing: the lease moved to the recorded runner, whose instance the
    # reconciler reaps (and the state-change event then returns the lease)
    assert report.as_dict() == {"dead_lettered": 1}
    assert "launch_id" not in fleet.job(jobs[0])
    assert fleet.job(jobs[0])["error_code"] == "AccessDeniedException"
    [dead] = fleet.dead_letters(1)
    assert "AccessDeniedException" in dead["last_error"]
    [launch] = _launches(fleet)
    assert launch["state"] == "failed"
    assert "AccessDeniedException" in launch["reason"]
    assert fleet.gitlab_runners() == []
    [instance] = fleet.instances("docker")
    record = fleet.record(runner_key(instance["InstanceId"]))
    assert (record["state"], record.get("gitlab_runner_id")) == ("booting", None)
    terminate_instances(fleet.ec2, [instance["InstanceId"]])
    fleet.deliver_events()
    assert fleet.leases("docker") == 0


# -- instances that terminate while scale-up works on them, and cleanup that outlasts GitLab ---------------------------


def test_an_instance_terminated_before_its_record_gives_its_lease_back_and_its_job_another_launch(
    fleet: Fleet,
) -> None:
    # given an instance that terminates right after CreateFleet made it, before scale-up records it
    [job] = fleet.pipeline(["docker"])
    handled: list[str] = []

    def terminate_it(answer: dict[str, Any]) -> None:
        [instance_id] = answer["Instances"][0]["InstanceIds"]
        handled.append(fleet.instance_terminated(instance_id))

    with WireFaults(fleet.ec2) as faults:
        faults.run_after("CreateFleet", terminate_it)
        # when
        report = fleet.scale_up().handle_messages(fleet.take_queued(1))
    # then nothing of it is left: no lease, no runner, no token; the job goes back for another launch
    assert fleet.leases("docker") == 0
    assert fleet.gitlab_runners() == []
    assert handled == ["terminated before recorded"]
    assert report.as_dict() == {"retried": 1}
    assert fleet.instances() == []
    assert "launch_id" not in fleet.job(job)
    [again] = [QueuedJob.from_json(b) for b in fleet.take_queued(1)]
    assert again.job_id == job
    [launch] = _launches(fleet)
    assert (launch["state"], launch["leases"]) == ("failed", 0)
    # and the retry launches it
    assert fleet.scale_up().handle([again]).as_dict() == {"launched": 1}
    assert fleet.leases("docker") == 1


def test_an_instance_terminated_between_its_runner_and_its_record_leaves_no_token_or_runner(fleet: Fleet) -> None:
    # given an instance that terminates once its GitLab runner exists and its token is written
    [job] = fleet.pipeline(["docker"])
    handled: list[str] = []

    def terminate_it(_: dict[str, Any]) -> None:
        [instance] = fleet.instances("docker")
        handled.append(fleet.instance_terminated(instance["InstanceId"]))

    with WireFaults(fleet.runtime.aws().dynamodb) as faults:
        faults.run_after("PutItem", terminate_it)
        # when
        report = fleet.scale_up().handle_messages(fleet.take_queued(1))
    # then the handler returned the lease; scale-up deleted the runner and token it had just made
    assert fleet.leases("docker") == 0
    assert fleet.gitlab_runners() == []
    assert handled == ["terminated"]
    assert report.as_dict() == {"retried": 1}
    [made] = fleet.runtime.store().scan("runner")
    assert made["state"] == "terminated"
    assert not fleet.token_exists(made["instance_id"])
    assert "launch_id" not in fleet.job(job)


def test_gitlab_down_during_termination_cleans_aws_first_and_a_retried_event_finishes(fleet: Fleet) -> None:
    # given a running runner
    fleet.pipeline(["docker"])
    fleet.run()
    [instance] = fleet.instances("docker")
    instance_id = instance["InstanceId"]
    [runner] = fleet.gitlab_runners()
    # when it terminates while GitLab answers 500 to the runner's deletion
    fleet.gitlab.fail_next("DELETE", r"/runners/\d+", status=500)
    with pytest.raises(RetryableError):
        fleet.instance_terminated(instance_id)
    # then everything of ours in AWS is clean, and the record names what GitLab still has
    assert fleet.leases("docker") == 0
    assert not fleet.token_exists(instance_id)
    record = fleet.record(runner_key(instance_id))
    assert (record["state"], record["gitlab_runner_id"], record["gitlab_cleanup"]) == (
        "terminated",
        runner["id"],
        "pending",
    )
    assert "token_cleanup" not in record
    assert [r["id"] for r in fleet.gitlab_runners()] == [runner["id"]]
    # when EventBridge retries the event, GitLab being back
    calls = fleet.gitlab_calls("DELETE", "/runners/:id")
    assert fleet.instance_terminated(instance_id) == "cleaned up"
    # then only the GitLab runner is deleted, and the mark cleared
    assert fleet.gitlab_calls("DELETE", "/runners/:id") == calls + 1
    assert fleet.gitlab_runners() == []
    assert "gitlab_cleanup" not in fleet.record(runner_key(instance_id))
    assert fleet.leases("docker") == 0
    # and a late duplicate does nothing more
    assert fleet.instance_terminated(instance_id) == "already terminated"
    assert fleet.gitlab_calls("DELETE", "/runners/:id") == calls + 1


def test_duplicate_events_at_once_return_the_lease_once(fleet: Fleet) -> None:
    # given two running runners
    fleet.pipeline(["docker"], ["docker"])
    fleet.run()
    victim = fleet.instances("docker")[0]["InstanceId"]
    # when the same event is handled three times at once
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(fleet.instance_terminated(victim))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # then the lease came back once, and the runner and token are gone
    assert results.count("terminated") == 1
    assert fleet.leases("docker") == 1
    assert [r for r in fleet.gitlab_runners() if victim in r["description"]] == []
    assert not fleet.token_exists(victim)
    assert fleet.record(runner_key(victim))["state"] == "terminated"


def test_a_job_abandoned_by_a_dead_launch_joins_the_batch_launch(fleet: Fleet) -> None:
    # given one job claimed long ago by an invocation that died before taking leases, and a fresh one
    jobs = fleet.pipeline(["docker"], ["docker"])
    bodies = fleet.take_queued(2)
    now = time.time()
    fleet.runtime.store().claims.claim_job(fleet.sandbox.project_id, jobs[0], "launch-of-a-dead-invocation", "docker")
    # when both come in one batch once that claim is stale
    with WireFaults(fleet.ec2) as faults:
        report = fleet.scale_up(clock=lambda: now + 300).handle_messages(bodies)
    # then both launch together, with one CreateFleet call and one launch
    assert report.as_dict() == {"launched": 2}
    assert len(faults.calls_to("CreateFleet")) == 1
    assert len(fleet.instances("docker")) == 2
    assert len({fleet.job(j)["launch_id"] for j in jobs}) == 1
    assert fleet.leases("docker") == 2


def test_an_identity_set_while_the_handler_terminates_is_still_cleaned_up(fleet: Fleet) -> None:
    # given a runner whose record has no GitLab identity yet: scale-up is between its token and identity writes
    fleet.pipeline(["docker"])
    fleet.run()
    [instance] = fleet.instances("docker")
    instance_id = instance["InstanceId"]
    [runner] = fleet.gitlab_runners()
    store = fleet.runtime.store()
    fleet.runtime.aws().dynamodb.update_item(
        TableName=store.table, Key={"pk": {"S": runner_key(instance_id)}}, UpdateExpression="REMOVE gitlab_runner_id"
    )
    # when scale-up's identity write lands right after the handler read the record
    with WireFaults(fleet.runtime.aws().dynamodb) as faults:
        faults.run_after("GetItem", lambda _: store.runners.set_runner_identity(instance_id, int(runner["id"])))
        result = fleet.instance_terminated(instance_id)
    # then the handler still finds that runner, and deletes it
    assert result == "terminated"
    assert fleet.gitlab_runners() == []
    assert not fleet.token_exists(instance_id)
    assert fleet.leases("docker") == 0


def test_a_waiting_copy_of_a_launched_job_is_dropped_while_its_pool_stays_full(fleet: Fleet) -> None:
    """SQS delivers at least once: a batch whose handler failed after it re-queued a job comes back whole, so a
    job can have a waiting copy after another copy launched it. While the pool stays full that copy would wait
    again and again; it is dropped instead, and a job that really waits keeps waiting."""
    # given a pool of one runner, one job launched and one waiting
    config = fleet.with_pool("docker", max_runners=1)
    fleet.pipeline(["docker"], ["docker"])
    assert fleet.scale_up(config).handle_messages(fleet.take_queued(2)).as_dict() == {"launched": 1, "waiting": 1}
    [waiting] = [QueuedJob.from_json(b) for b in fleet.take_queued(1)]
    [launched_id] = [j for j in (waiting.job_id - 1, waiting.job_id + 1) if fleet.job(j).get("launch_id")]
    copy = waiting.but(job_id=launched_id)

    # when both come back while the pool is still full
    report = fleet.scale_up(config).handle([copy, waiting])

    # then the copy is dropped and the waiting job waits again
    assert report.as_dict() == {"duplicate": 1, "waiting": 1}
    [again] = [QueuedJob.from_json(b) for b in fleet.take_queued(1)]
    assert again.job_id == waiting.job_id
    assert len(fleet.instances("docker")) == 1
