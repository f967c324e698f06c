"""Scale-up and the instance-state handler under the AWS shim's rules: transaction conflicts and idempotency tokens.

DynamoDB cancels transactions that meet another on an item, and EC2 answers a repeated CreateFleet ``ClientToken``
with the first call's fleet (or refuses it when the parameters changed). The shim enforces both in front of moto;
faults are configured at the wire (``LocalAws.shim``, ``WireFaults``). Each test counts what an operator would:
instances in EC2 (DescribeInstances, by launch id), leases against live instances, where the jobs went.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from botocore.exceptions import ClientError

from chalicelib.jobs_queue import QueuedJob
from chalicelib.scaling.store.table import GIVE_BACK_ATTEMPTS
from chalicelib.store import launch_key, pool_key, runner_key
from tests.faults import SimulatedCrash, WireFaults
from tests.integration.test_scale_up import Fleet


@pytest.fixture
def fleet(fresh_sandbox: Any) -> Fleet:
    return Fleet(fresh_sandbox)


def _conflicts(fleet: Fleet, prefix: str, times: int, **extra: Any) -> None:
    fleet.sandbox.aws.shim("transaction-conflicts", "inject", prefix=prefix, times=times, **extra)


def _fired(fleet: Fleet) -> int:
    return int(fleet.sandbox.aws.shim("transaction-conflicts", "status")["fired"])


def _every_instance_of(fleet: Fleet, launch_id: str) -> list[str]:
    """Every instance ever made for a launch, terminated ones included: a second fleet would show here (read once
    EC2's listing caught up with the launches)."""
    fleet.sandbox.aws.settle()
    found = fleet.ec2.describe_instances(Filters=[{"Name": "tag:runner-fleet:launch-id", "Values": [launch_id]}])
    return sorted(i["InstanceId"] for r in found["Reservations"] for i in r["Instances"])


def _live_runner_records(fleet: Fleet, pool: str) -> int:
    return sum(
        1 for r in fleet.runtime.store().scan("runner") if r.get("pool") == pool and r.get("state") != "terminated"
    )


# -- transaction conflicts -----------------------------------------------------------------------------------------


def test_conflicts_on_the_pool_item_during_termination_still_return_the_lease(fleet: Fleet) -> None:
    # given two running runners
    fleet.pipeline(["docker"], ["docker"])
    fleet.run()
    victim = fleet.instances("docker")[0]["InstanceId"]
    # when one terminates while other transactions keep meeting its termination on the pool's counter
    _conflicts(fleet, "POOL#", times=5)
    result = fleet.instance_terminated(victim)
    # then the termination is tried again, backing off, until it lands: the lease is back, the record terminated
    assert result == "terminated"
    assert _fired(fleet) == 5
    assert fleet.leases("docker") == 1 == len(fleet.instances("docker"))
    assert fleet.record(runner_key(victim))["state"] == "terminated"
    assert [r for r in fleet.gitlab_runners() if victim in r["description"]] == []


def test_conflicts_that_outlast_the_retries_fail_the_event_and_its_retry_returns_the_lease(fleet: Fleet) -> None:
    # given a running runner
    fleet.pipeline(["docker"])
    fleet.run()
    [instance] = fleet.instances("docker")
    victim = instance["InstanceId"]
    # when its termination meets conflicts on every attempt a lease give-back makes
    _conflicts(fleet, "POOL#", times=GIVE_BACK_ATTEMPTS)
    with pytest.raises(ClientError) as failed:
        fleet.instance_terminated(victim)
    # then the event fails (EventBridge retries it): the runner is not taken as terminated, nothing half done
    assert failed.value.response["Error"]["Code"] == "TransactionCanceledException"
    assert fleet.record(runner_key(victim))["state"] == "booting"
    assert fleet.leases("docker") == 1
    # and the retried event returns the lease and cleans up
    assert fleet.instance_terminated(victim) == "terminated"
    assert fleet.leases("docker") == 0
    assert fleet.gitlab_runners() == []
    assert not fleet.token_exists(victim)


def test_conflicts_while_leases_are_taken_and_records_written_launch_every_job_once(fleet: Fleet) -> None:
    # given conflicts on the pool's counter, the launch records and the runner records
    jobs = fleet.pipeline(["docker"], ["docker"], ["docker"])
    _conflicts(fleet, "POOL#", times=2)
    _conflicts(fleet, "LAUNCH#", times=2)
    _conflicts(fleet, "RUNNER#", times=1, operations=["TransactWriteItems", "UpdateItem"])
    # when the jobs are handled
    report = fleet.scale_up().handle_messages(fleet.take_queued(3))
    # then each job launched once, and the pool counts exactly its live instances
    assert report.as_dict() == {"launched": 3}
    assert _fired(fleet) == 5
    assert len(fleet.instances("docker")) == 3
    assert fleet.leases("docker") == 3 == _live_runner_records(fleet, "docker")
    [launch_id] = {fleet.job(j)["launch_id"] for j in jobs}
    assert fleet.record(launch_key(launch_id))["leases"] == 0
    fleet.assert_every_gitlab_runner_is_recorded()


def test_conflicts_on_the_pool_counter_past_every_attempt_make_the_jobs_wait_not_fail_the_batch(fleet: Fleet) -> None:
    """A hot pool counter in a burst: when other transactions meet the lease's on it past every attempt, scale-up
    takes nothing and the jobs wait for capacity, back in seconds. Before, the batch failed back to SQS and its
    jobs waited out the queue's visibility timeout (six times the function's timeout)."""
    # given two jobs, and conflicts on the pool's counter for more attempts than the store makes
    jobs = fleet.pipeline(["docker"], ["docker"])
    _conflicts(fleet, "POOL#", times=8)

    # when their batch is handled
    report = fleet.scale_up().handle_messages(fleet.take_queued(2))

    # then nothing was launched nor held, and both jobs come back to try again
    assert report.as_dict() == {"waiting": 2}
    assert _fired(fleet) == 8
    assert fleet.leases("docker") == 0 and fleet.instances() == []
    back = fleet.take_queued(2, timeout=30)
    assert sorted(QueuedJob.from_json(b).job_id for b in back) == sorted(jobs)
    assert fleet.scale_up().handle_messages(back).as_dict() == {"launched": 2}


def test_conflicts_while_unused_leases_are_given_back_leave_no_lease_held(fleet: Fleet) -> None:
    # given a spot shortage (no fallback) that makes one instance of three, and conflicts on the pool's counter
    config = fleet.with_pool("docker", on_demand_fallback=False)
    fleet.pipeline(["docker"], ["docker"], ["docker"])
    _conflicts(fleet, "POOL#", times=3)
    with WireFaults(fleet.ec2) as faults:
        faults.capacity_shortage(["m7i.large"], unavailable=2)
        report = fleet.scale_up(config).handle_messages(fleet.take_queued(3))
    # then the two unused leases went back despite the conflicts: the counter equals the live instances
    assert report.as_dict() == {"launched": 1, "retried": 2}
    assert _fired(fleet) == 3
    assert fleet.leases("docker") == 1 == len(fleet.instances("docker"))


# -- idempotency tokens: resumed and timed-out launches ------------------------------------------------------------


def test_a_createfleet_that_never_answered_is_resumed_with_the_same_request_not_launched_again(fleet: Fleet) -> None:
    # given CreateFleet reaching EC2 and launching, but no answer coming back to any of botocore's attempts
    jobs = fleet.pipeline(["docker"], ["docker"])
    bodies = fleet.take_queued(2)
    with WireFaults(fleet.ec2) as faults:
        faults.lose_answer("CreateFleet", times=4)
        first = fleet.scale_up().handle_messages(bodies)
    # then the jobs are retried still claimed by their launch, which keeps its leases: nothing is released
    assert first.as_dict() == {"retried": 2}
    [launch_id] = {fleet.job(j)["launch_id"] for j in jobs}
    launch = fleet.record(launch_key(launch_id))
    assert (launch["state"], launch["leases"]) == ("incomplete", 2)
    assert fleet.leases("docker") == 2
    made = _every_instance_of(fleet, launch_id)
    assert len(made) == 2  # one fleet: botocore's retries carried the same token
    # when the jobs come back
    with WireFaults(fleet.ec2) as faults:
        again = fleet.scale_up().handle_messages(fleet.take_queued(2, timeout=30))
    # then the launch is resumed: the instances the lost call made are adopted, none is launched again
    assert again.as_dict() == {"launched": 2}
    assert faults.calls_to("CreateFleet") == []
    assert _every_instance_of(fleet, launch_id) == made
    assert len(fleet.instances("docker")) == 2 == fleet.leases("docker")
    assert fleet.record(launch_key(launch_id))["state"] == "launched"
    fleet.assert_every_gitlab_runner_is_recorded()


def test_a_createfleet_failing_with_a_5xx_is_resumed_with_its_first_request_after_a_config_change(
    fleet: Fleet,
) -> None:
    # given CreateFleet answering 500 to every attempt (EC2 may or may not have launched)
    [job] = fleet.pipeline(["docker"])
    with WireFaults(fleet.ec2) as faults:
        faults.fail("CreateFleet", "InternalError", times=None)
        first = fleet.scale_up().handle_messages(fleet.take_queued(1))
        [sent] = faults.calls_to("CreateFleet")
    assert first.as_dict() == {"retried": 1}
    launch_id = fleet.job(job)["launch_id"]
    assert fleet.record(launch_key(launch_id))["state"] == "incomplete"
    # when the operator changes the pool's instance types meanwhile, and the job comes back
    changed = fleet.with_pool("docker", instance_types=["c7i.large"])
    with WireFaults(fleet.ec2) as faults:
        again = fleet.scale_up(changed).handle_messages(fleet.take_queued(1, timeout=30))
        [resent] = faults.calls_to("CreateFleet")
    # then the launch sends exactly its first request again (same token, same overrides), and launches once
    assert resent.params == sent.params
    assert again.as_dict() == {"launched": 1}
    [instance] = fleet.instances("docker")
    assert instance["InstanceType"] != "c7i.large"
    assert _every_instance_of(fleet, launch_id) == [instance["InstanceId"]]
    assert fleet.leases("docker") == 1


def test_a_resumed_launch_whose_instances_are_gone_gets_the_first_fleet_back_not_a_second(fleet: Fleet) -> None:
    # given a scale-up that dies right after CreateFleet answered, and a config change afterwards
    jobs = fleet.pipeline(["docker"], ["docker"])
    bodies = fleet.take_queued(2)
    now = time.time()
    with WireFaults(fleet.ec2) as faults, pytest.raises(SimulatedCrash):
        faults.crash_after("CreateFleet")
        fleet.scale_up(clock=lambda: now).handle_messages(bodies)
    [launch_id] = {fleet.job(j)["launch_id"] for j in jobs}
    made = _every_instance_of(fleet, launch_id)
    # and its instances terminated (spot reclaimed them) before anyone recorded them
    for instance_id in made:
        assert fleet.instance_terminated(instance_id) == "terminated before recorded"
    changed = fleet.with_pool("docker", instance_types=["c7i.large", "m7i.large"], on_demand_fallback=False)
    # when the batch comes back once the launch is stale
    with WireFaults(fleet.ec2) as faults:
        report = fleet.scale_up(changed, clock=lambda: now + 300).handle_messages(bodies)
    # then the launch's own request went again and EC2 answered with the first fleet: no second fleet, no
    # IdempotentParameterMismatch, every lease back, the jobs retried
    assert len(faults.calls_to("CreateFleet")) == 1
    assert _every_instance_of(fleet, launch_id) == made
    assert fleet.instances() == []
    assert fleet.leases("docker") == 0
    assert report.as_dict() == {"retried": 2}
    assert sorted(QueuedJob.from_json(b).job_id for b in fleet.take_queued(2, timeout=30)) == sorted(jobs)


def test_an_on_demand_fallback_that_never_answered_is_resumed_not_given_up(fleet: Fleet) -> None:
    # given a spot shortage of two of three, and the on-demand fallback launching but its answer lost
    jobs = fleet.pipeline(["docker"], ["docker"], ["docker"])
    with WireFaults(fleet.ec2) as faults:
        faults.capacity_shortage(["m7i.large"], unavailable=2)
        faults.fail("CreateFleet", "InternalError", times=None, after=1)
        first = fleet.scale_up().handle_messages(fleet.take_queued(3))
    [launch_id] = {fleet.job(j)["launch_id"] for j in jobs}
    # then the spot runner launched, and the two jobs of the fallback wait on the launch, which keeps their leases
    assert first.as_dict() == {"launched": 1, "retried": 2}
    assert fleet.record(launch_key(launch_id))["leases"] == 2
    assert fleet.leases("docker") == 3
    # when they come back (the fallback now answers)
    with WireFaults(fleet.ec2) as faults:
        faults.capacity_shortage(["m7i.large"], unavailable=2)
        again = fleet.scale_up().handle_messages(fleet.take_queued(2, timeout=30))
    # then the launch sends its plan again: the spot call is answered with its first fleet, the fallback launches
    assert again.as_dict() == {"launched": 2}
    made = _every_instance_of(fleet, launch_id)
    assert len(made) == 3
    assert len(fleet.instances("docker")) == 3 == fleet.leases("docker") == _live_runner_records(fleet, "docker")
    assert int(fleet.record(pool_key("docker"))["leases"]) == 3


def test_a_fallback_that_never_answered_whose_jobs_went_away_is_settled_by_reconcile(fleet: Fleet) -> None:
    """The on-demand fallback launched its instances but its answers were lost, and its jobs were cancelled before
    they came back to resume the launch. The launch keeps its leases in the live index (every write of a launch
    record keeps it there while it holds any), so reconcile settles it: the fallback's instances are terminated
    and their leases given back. Before, finishing the spot part took the launch out of the index and nothing
    ever gave those two leases back."""
    from chalicelib import runtime
    from chalicelib.lifecycle.reconcile import build_reconciler
    from chalicelib.lifecycle.rules import STALE_LAUNCH_SECONDS

    # given a spot shortage of two of three, and the on-demand fallback launching with every answer lost
    jobs = fleet.pipeline(["docker"], ["docker"], ["docker"])
    with WireFaults(fleet.ec2) as faults:
        faults.capacity_shortage(["m7i.large"], unavailable=2)
        faults.run_after("CreateFleet", lambda _: faults.lose_answer("CreateFleet", times=10))
        first = fleet.scale_up().handle_messages(fleet.take_queued(3))
    [launch_id] = {fleet.job(j)["launch_id"] for j in jobs}
    assert first.as_dict() == {"launched": 1, "retried": 2}
    made = _every_instance_of(fleet, launch_id)
    assert len(made) == 3 and fleet.leases("docker") == 3
    launch = fleet.record(launch_key(launch_id))
    assert (launch["state"], launch["leases"], launch.get("live")) == ("incomplete", 2, "launch")

    # when the two jobs are cancelled before they come back, so nothing resumes the launch
    launched = {j for j in jobs if fleet.job(j).get("outcome") == "launched"}
    for job_id in set(jobs) - launched:
        fleet.gitlab.set_job_status(fleet.sandbox.project_id, job_id, "canceled")
    fleet.gitlab.wait_for_deliveries(timeout=30)
    back = fleet.scale_up().handle_messages(fleet.take_queued(2, timeout=30))
    assert back.as_dict() == {"not_pending": 2}
    fleet.sandbox.aws.settle()
    report = build_reconciler(
        fleet.config,
        runtime.aws(),
        runtime.gitlab_api(),
        runtime.scale_up,
        clock=lambda: time.time() + STALE_LAUNCH_SECONDS + 1,
    ).run()

    # then reconcile settled it: the fallback's two instances terminated, their leases back
    assert report.metrics["OrphansReaped.StaleLaunch"] == 1
    assert len(fleet.instances("docker")) == 1 == fleet.leases("docker")
    settled = fleet.record(launch_key(launch_id))
    assert settled["leases"] == 0 and "live" not in settled
