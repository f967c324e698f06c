"""The instance-state handler under Lambda's asynchronous retries, as the event pump now applies them.

EventBridge invokes the handler asynchronously: Lambda tries a failing invocation three times in all (waits of one
and two minutes, shortened here) and then drops the event, or, deployed through the stack (``make package``), sends
it to the events dead-letter queue for an operator
(https://docs.aws.amazon.com/lambda/latest/dg/invocation-async-error-handling.html; the pump's own test is
``test_pump.py``). The handler must not need a fourth try: whatever an event given up on leaves undone has to be
written down where reconcile can find it, and nothing it holds (a capacity lease) may stay taken.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from chalicelib.lifecycle.instances import parse_state_change
from chalicelib.store import runner_key
from fleetctl.sandbox.ec2_events import terminate_instances
from fleetctl.sandbox.pump import EventPump
from tests.integration.test_scale_up import Fleet, state_change

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def fleet(fresh_sandbox: Any) -> Fleet:
    return Fleet(fresh_sandbox)


def _quick_pump(fleet: Fleet) -> EventPump:
    """The sandbox's EventBridge delivery with Lambda's retry waits cut from 60 and 120 seconds to 1 second."""
    import app

    return EventPump(app.app, fleet.runtime.aws(), event_retry_delays=(1, 1)).connect()


def _running_runner(fleet: Fleet) -> tuple[str, int]:
    fleet.pipeline(["docker"])
    fleet.run()
    [instance] = fleet.instances("docker")
    [runner] = fleet.gitlab_runners()
    assert fleet.leases("docker") == 1
    return str(instance["InstanceId"]), int(runner["id"])


def _terminate(fleet: Fleet, instance_id: str) -> None:
    terminate_instances(fleet.ec2, [instance_id])


def _pump_until(pump: EventPump, done: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pump.pump_events()
        if done():
            return
        time.sleep(0.2)
    raise AssertionError("the event pump did not get there in time")


def test_gitlab_down_for_all_three_attempts_leaves_the_lease_back_and_the_cleanup_written_down(fleet: Fleet) -> None:
    # given a running runner, and GitLab failing the next three deletions of a runner
    instance_id, runner_id = _running_runner(fleet)
    pump = _quick_pump(fleet)
    deletions = fleet.gitlab_calls("DELETE", "/runners/:id")
    fleet.gitlab.fail_next("DELETE", r"/runners/\d+", status=503, count=3)

    # when the instance terminates and EventBridge hands its event to the handler
    _terminate(fleet, instance_id)
    _pump_until(pump, lambda: pump.dropped_events)

    # then Lambda's three attempts were made and the event dropped
    [dropped] = pump.dropped_events
    assert (dropped.handler, dropped.attempts, dropped.detail_type) == (
        "instance_state",
        3,
        "EC2 Instance State-change Notification",
    )
    assert fleet.gitlab_calls("DELETE", "/runners/:id") == deletions + 3
    # and nothing of ours is held: the lease is back, the token gone
    assert fleet.leases("docker") == 0
    assert not fleet.token_exists(instance_id)
    # and what is left undone is on the record, for reconcile to finish
    record = fleet.record(runner_key(instance_id))
    assert (record["state"], record["gitlab_runner_id"], record["gitlab_cleanup"]) == (
        "terminated",
        runner_id,
        "pending",
    )
    assert [int(r["id"]) for r in fleet.gitlab_runners()] == [runner_id]

    # when that record is acted on later, GitLab being back (the cleanup reconcile runs is the handler's own)
    result = fleet.runtime.instance_events().handle(parse_state_change(state_change(instance_id)))

    # then only the GitLab runner was left to delete
    assert result == "cleaned up"
    assert fleet.gitlab_runners() == []
    assert "gitlab_cleanup" not in fleet.record(runner_key(instance_id))
    assert fleet.leases("docker") == 0


def test_gitlab_back_by_the_third_attempt_finishes_the_cleanup(fleet: Fleet) -> None:
    # given a running runner, and GitLab failing the next two deletions of a runner
    instance_id, runner_id = _running_runner(fleet)
    pump = _quick_pump(fleet)
    fleet.gitlab.fail_next("DELETE", r"/runners/\d+", status=500, count=2)

    # when the instance terminates
    _terminate(fleet, instance_id)

    def cleaned() -> bool:
        record = fleet.record(runner_key(instance_id))
        return record["state"] == "terminated" and "gitlab_cleanup" not in record

    _pump_until(pump, cleaned)

    # then the third attempt deleted the GitLab runner, and no event was dropped
    assert pump.dropped_events == []
    assert fleet.gitlab_runners() == []
    assert fleet.leases("docker") == 0
    assert not fleet.token_exists(instance_id)
    assert fleet.record(runner_key(instance_id))["state"] == "terminated"
    assert runner_id not in {int(r["id"]) for r in fleet.gitlab.runners()}
