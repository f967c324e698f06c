"""The runner token hand-off under AWS's throughput quotas (the AWS shim's ``ssm-throughput`` rule is on).

Parameter Store would take one PutParameter per launched instance at about 3 a second; the hand-off is a DynamoDB
item instead (``chalicelib/scaling/tokens.py``), keyed by the instance role session's ``aws:userid``. These tests
show the quota would bite the old hand-off, that the new one holds 5 launches a second with nothing lost, and
that the item scale-up writes is the one the instance's own session, and no other, may read.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import ClientError

from chalicelib.aws import DEFAULT_CONFIG, AwsClients
from chalicelib.scaling.tokens import session_user_id
from chalicelib.store import runner_key
from fleetctl.iam_policies import runner_instance_policy
from tests.faults import WireFaults
from tests.iam_recorder import Request, allowing_statements
from tests.integration.test_scale_up import Fleet

LAUNCHES_PER_SECOND = 5
SUSTAINED_SECONDS = 10


@pytest.fixture
def fleet(fresh_sandbox: Any) -> Fleet:
    return Fleet(fresh_sandbox)


@pytest.mark.slow
def test_one_parameter_store_write_per_launch_would_be_throttled_at_5_launches_a_second(fleet: Fleet) -> None:
    """Why the hand-off left Parameter Store: PutParameter gets 3 transactions a second per account and Region
    with standard throughput (AWS Support, quoted in github-aws-runners/terraform-aws-github-runner issue 2944;
    the quota page "AWS Systems Manager endpoints and quotas" lists only the read quotas). One SecureString per
    launched instance, written at 5 launches a second by clients with the product's retry settings (botocore
    standard mode, 3 attempts), loses writes however the retries back off."""
    ssm = AwsClients(config=DEFAULT_CONFIG).ssm
    failures: list[str] = []
    lock = threading.Lock()

    def put(n: int) -> None:
        try:
            ssm.put_parameter(Name=f"/runner-fleet/old-handoff/i-{n:017x}", Value="glrt-x", Type="SecureString")
        except ClientError as exc:
            with lock:
                failures.append(exc.response["Error"]["Code"])

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as workers:
        for n in range(LAUNCHES_PER_SECOND * SUSTAINED_SECONDS):
            workers.submit(put, n)
            time.sleep(1 / LAUNCHES_PER_SECOND)
    elapsed = time.monotonic() - started
    # At most the burst plus 3 a second get through, so at least the rest fail once their retries are spent.
    writes = LAUNCHES_PER_SECOND * SUSTAINED_SECONDS
    assert len(failures) >= writes - (3 + 3 * elapsed) > 0
    assert set(failures) == {"ThrottlingException"}
    assert fleet.sandbox.aws.shim("ssm-throughput", "throttled")["PutParameter"] >= len(failures)


@pytest.mark.slow
def test_5_launches_a_second_for_10_seconds_lose_no_launch_and_meet_no_throttling(fleet: Fleet) -> None:
    # given 50 pending jobs, and a pool with room for all of them
    total = LAUNCHES_PER_SECOND * SUSTAINED_SECONDS
    config = fleet.with_pool("docker", max_runners=total)
    fleet.pipeline(*[["docker"]] * total)
    bodies = fleet.take_queued(total)
    scale_up = fleet.scale_up(config)
    reports: list[dict[str, int]] = []
    lock = threading.Lock()

    def launch(body: str) -> None:
        report = scale_up.handle_messages([body]).as_dict()
        with lock:
            reports.append(report)

    # when a job arrives every 200 ms for 10 seconds, each handled by an invocation of its own
    with WireFaults(fleet.runtime.aws().ssm) as ssm, ThreadPoolExecutor(max_workers=16) as invocations:
        for body in bodies:
            invocations.submit(launch, body)
            time.sleep(1 / LAUNCHES_PER_SECOND)
    # then no job was re-queued for a throttled or failed step: each launched in the invocation it arrived in, or
    # waited for the pool's counter when 16 invocations at once kept meeting on it past every attempt (how often
    # depends on how fast this machine answers them; such a job asks again and launches then). The wall time is
    # not judged; the hand-off itself has no quota in the way.
    assert {outcome for report in reports for outcome in report} <= {"launched", "waiting"}
    waiting = sum(report.get("waiting", 0) for report in reports)
    for _ in range(10):
        if not waiting:
            break
        again = scale_up.handle_messages(fleet.take_queued(waiting, timeout=30)).as_dict()
        assert set(again) <= {"launched", "waiting"}
        waiting = again.get("waiting", 0)
    assert waiting == 0
    instances = fleet.instances("docker")
    assert len(instances) == total
    assert fleet.leases("docker") == total
    assert fleet.take_queued(0, timeout=0.5) == []
    assert fleet.dead_letters() == []
    # each with its token where its instance reads it, and no Parameter Store write or throttling on the way
    for instance in instances:
        assert fleet.verify_runner_token(fleet.token_of(instance["InstanceId"])["token"]) == 200
    assert ssm.calls_to("PutParameter") == []
    assert fleet.sandbox.aws.shim("ssm-throughput", "throttled") == {}


def _instance_may(fleet: Fleet, action: str, instance_id: str, key: str) -> bool:
    """Whether the runner policy lets ``instance_id``'s role session make ``action`` on the item ``key``: the
    session's ``aws:userid`` is "<role id>:<instance id>" (IAM User Guide, "IAM policy elements: Variables and
    tags", "Request information that you can use for policy variables")."""
    pool = fleet.config.pool(str(fleet.record(runner_key(instance_id))["pool"]))
    policy = runner_instance_policy(fleet.config, pool)
    context = (
        ("aws:userid", (session_user_id(fleet.runner_role_id(pool.name), instance_id),)),
        ("dynamodb:LeadingKeys", (key,)),
    )
    table = f"arn:aws:dynamodb:us-east-1:123456789012:table/{fleet.config.state.table}"
    return bool(allowing_statements(policy, Request("runner", "", action, action, table, context))[0])


def test_each_instance_may_read_and_delete_its_own_token_item_and_not_its_neighbours(fleet: Fleet) -> None:
    # given two runners
    fleet.pipeline(["docker"], ["docker"])
    fleet.run()
    first, second = (i["InstanceId"] for i in fleet.instances("docker"))
    # when each looks for its token under the key scale-up recorded for it
    keys = {i: str(fleet.record(runner_key(i))["token_key"]) for i in (first, second)}
    # then its own session may read and delete it, the other's may not
    for action in ("dynamodb:GetItem", "dynamodb:DeleteItem"):
        assert _instance_may(fleet, action, first, keys[first])
        assert _instance_may(fleet, action, second, keys[second])
        assert not _instance_may(fleet, action, first, keys[second])
        assert not _instance_may(fleet, action, second, keys[first])
    # and what it reads is a token GitLab accepts
    assert fleet.verify_runner_token(str(fleet.record(keys[first])["token"])) == 200


def test_each_pools_instances_get_their_token_under_their_own_pools_role(fleet: Fleet) -> None:
    # given a runner of each pool
    fleet.pipeline(["docker"], ["dind"])
    fleet.run()
    [docker] = (i["InstanceId"] for i in fleet.instances("docker"))
    [build] = (i["InstanceId"] for i in fleet.instances("build"))
    keys = {i: str(fleet.record(runner_key(i))["token_key"]) for i in (docker, build)}

    # then each token is keyed by the instance's own pool's role, which the instance's profile holds
    assert keys[docker] == fleet.token_key(docker)
    assert keys[build] == fleet.token_key(build)
    assert keys[docker].split(":")[0] != keys[build].split(":")[0]
    # and neither pool's role may read the other's token, though both sessions name a real instance
    for action in ("dynamodb:GetItem", "dynamodb:DeleteItem"):
        assert _instance_may(fleet, action, docker, keys[docker])
        assert _instance_may(fleet, action, build, keys[build])
        assert not _instance_may(fleet, action, docker, keys[build])
        assert not _instance_may(fleet, action, build, keys[docker])


def test_an_unreadable_runner_role_launches_nothing_and_retries_the_jobs(fleet: Fleet) -> None:
    # given IAM refusing GetRole on the runner role (the Lambda role lost iam:GetRole)
    fleet.pipeline(["docker"], ["docker"])
    bodies = fleet.take_queued(2)
    scale_up = fleet.scale_up()
    with WireFaults(fleet.runtime.aws().client("iam")) as faults:
        faults.fail("GetRole", "AccessDenied", status=403)
        # when
        report = scale_up.handle_messages(bodies)
    # then nothing was launched or claimed, and both jobs come back, an attempt spent
    assert report.as_dict() == {"retried": 2}
    assert fleet.instances() == []
    assert fleet.leases("docker") == 0
    retried = fleet.take_queued(2)
    assert all("AccessDenied" in body for body in retried)
    # and once IAM answers, the same invocation launches them
    assert scale_up.handle_messages(retried).as_dict() == {"launched": 2}
