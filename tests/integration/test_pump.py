"""The event pump against moto server: what Lambda's event sources and EventBridge would deliver, and when.

The handlers belong to a small Chalice app defined here, not to runner-fleet's ``app.py``: the pump's contract
(batching, deletion, redelivery, dead-lettering, schedules, event rules) is what is under test, so the handlers
only record what they were given.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from chalice.app import Chalice, CloudWatchEvent, SQSEvent

from chalicelib.aws import AwsClients
from fleetctl.sandbox.local_aws import LocalAws
from fleetctl.sandbox.pump import (
    ACCOUNT_ID,
    ASYNC_RETRY_DELAYS,
    MAX_EVENT_AGE_SECONDS,
    DroppedEvent,
    EventPump,
    LambdaService,
    chalice_timeouts,
)

JOBS_QUEUE = "pump-test-jobs"
SLOW_QUEUE = "pump-test-slow"
FAILING_QUEUE = "pump-test-failing"
FAILING_DLQ = "pump-test-failing-dlq"
RULE_PREFIX = "pump-test"
STATE_CHANGE = "EC2 Instance State-change Notification"
FAILING_SOURCE = "pump.test.failing"
BATCH_SIZE = 25
MAX_RECEIVE_COUNT = 2


@dataclass
class Recorded:
    batches: list[list[str]] = field(default_factory=list)
    failed_batches: list[list[str]] = field(default_factory=list)
    ticks: list[CloudWatchEvent] = field(default_factory=list)
    events: list[CloudWatchEvent] = field(default_factory=list)
    failed_events: list[tuple[float, CloudWatchEvent]] = field(default_factory=list)
    # The slow handler: when each invocation started and ended, and the AWS calls it completed.
    slow: list[tuple[str, float, float]] = field(default_factory=list)
    calls_done: list[str] = field(default_factory=list)
    tick_sleep: float = 0.0

    def clear(self) -> None:
        self.batches.clear()
        self.failed_batches.clear()
        self.ticks.clear()
        self.events.clear()
        self.failed_events.clear()
        self.slow.clear()
        self.calls_done.clear()
        self.tick_sleep = 0.0


recorded = Recorded()
app = Chalice(app_name="pump-test")


@app.on_sqs_message(queue=JOBS_QUEUE, batch_size=BATCH_SIZE)
def take_jobs(event: SQSEvent) -> None:
    recorded.batches.append([record.body for record in event])


@app.on_sqs_message(queue=FAILING_QUEUE, batch_size=10)
def always_fails(event: SQSEvent) -> None:
    recorded.failed_batches.append([record.body for record in event])
    raise RuntimeError("handler failed on purpose")


@app.on_sqs_message(queue=SLOW_QUEUE, batch_size=1)
def slow(event: SQSEvent) -> None:
    """Each message says what to do: ``sleep <s>`` then one AWS call, ``swallow <s>`` (sleep, then call AWS and
    catch whatever comes), or ``thread <s>`` (the call made from a worker thread of the handler's own pool)."""
    from concurrent.futures import ThreadPoolExecutor

    [record] = list(event)
    what, seconds = record.body.split()
    started = time.monotonic()
    time.sleep(float(seconds))

    def call() -> None:
        AwsClients().sqs.get_queue_url(QueueName=SLOW_QUEUE)
        recorded.calls_done.append(record.body)

    if what == "swallow":
        with contextlib.suppress(Exception):  # a function that swallows errors, on purpose
            call()
    elif what == "thread":
        with ThreadPoolExecutor(1) as pool:
            pool.submit(call).result()
    else:
        call()
    recorded.slow.append((record.body, started, time.monotonic()))


@app.schedule("rate(1 minute)")
def every_minute(event: CloudWatchEvent) -> None:
    recorded.ticks.append(event)
    time.sleep(recorded.tick_sleep)


@app.on_cw_event({"source": ["aws.ec2"], "detail-type": [STATE_CHANGE]})
def instance_changed(event: CloudWatchEvent) -> None:
    recorded.events.append(event)


@app.on_cw_event({"source": [FAILING_SOURCE]})
def event_fails(event: CloudWatchEvent) -> None:
    recorded.failed_events.append((time.monotonic(), event))
    raise RuntimeError("handler failed on purpose")


@dataclass(frozen=True)
class Queues:
    jobs: str
    failing: str
    dlq: str
    slow: str


@dataclass(frozen=True)
class World:
    clients: AwsClients
    queues: Queues

    @property
    def sqs(self) -> Any:
        return self.clients.sqs

    def pump(self, **options: Any) -> EventPump:
        return EventPump(app, self.clients, rule_prefix=RULE_PREFIX, **options).connect()

    def send(self, url: str, bodies: list[str]) -> None:
        for start in range(0, len(bodies), 10):
            entries = [{"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies[start : start + 10])]
            assert not self.sqs.send_message_batch(QueueUrl=url, Entries=entries).get("Failed")

    def counts(self, url: str) -> tuple[int, int]:
        """(visible, in flight) messages on a queue."""
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]), int(attributes["ApproximateNumberOfMessagesNotVisible"])

    def take_all(self, url: str) -> list[str]:
        """Receive and delete every visible message; their bodies."""
        bodies: list[str] = []
        while True:
            messages = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get(
                "Messages", []
            )
            if not messages:
                return bodies
            for message in messages:
                bodies.append(message["Body"])
                self.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    saved = dict(os.environ)
    aws = LocalAws().start()
    try:
        aws.export_environment()
        clients = AwsClients()
        sqs = clients.sqs
        jobs = sqs.create_queue(QueueName=JOBS_QUEUE)["QueueUrl"]
        dlq = sqs.create_queue(QueueName=FAILING_DLQ)["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        failing = sqs.create_queue(
            QueueName=FAILING_QUEUE,
            Attributes={
                "VisibilityTimeout": "1",
                "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": MAX_RECEIVE_COUNT}),
            },
        )["QueueUrl"]
        slow_queue = sqs.create_queue(QueueName=SLOW_QUEUE, Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
        yield World(clients, Queues(jobs=jobs, failing=failing, dlq=dlq, slow=slow_queue))
    finally:
        aws.stop()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def pump(world: World) -> Iterator[EventPump]:
    recorded.clear()
    pump = world.pump()
    yield pump
    # Leave nothing behind for the next test; in-flight messages of the failing queue come back within a second.
    failing = world.queues.failing
    assert _eventually(lambda: not world.take_all(failing) and world.counts(failing) == (0, 0), timeout=5)
    rule_queues = [
        world.sqs.get_queue_url(QueueName=f"{RULE_PREFIX}-rule-{name}")["QueueUrl"]
        for name in ("instance_changed", "event_fails")
    ]
    pump.close()
    assert _eventually(lambda: not world.take_all(world.queues.slow) and world.counts(world.queues.slow) == (0, 0))
    for url in (world.queues.jobs, world.queues.dlq, *rule_queues):
        world.take_all(url)


def _eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


# -- SQS ----------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("pump")
def test_batches_gather_more_than_one_receive_but_never_exceed_the_batch_size(world: World) -> None:
    # given 60 messages: more than SQS returns per receive, more than one batch; one batch at a time
    pump = world.pump(service=LambdaService(sqs_concurrency=1))
    bodies = [json.dumps({"job": i}) for i in range(60)]
    world.send(world.queues.jobs, bodies)

    # when
    first = pump.pump_queues()

    # then one batch filled to the handler's batch size, from several receives
    assert first == BATCH_SIZE
    assert [len(b) for b in recorded.batches] == [BATCH_SIZE]

    # when the rest is drained
    rest = pump.drain(timeout=20)

    # then every message arrived exactly once, in batches no larger than the batch size
    assert rest == len(bodies) - BATCH_SIZE
    assert all(10 < len(b) <= BATCH_SIZE for b in recorded.batches[:2])
    assert max(len(b) for b in recorded.batches) == BATCH_SIZE
    delivered = [body for batch in recorded.batches for body in batch]
    assert sorted(delivered) == sorted(bodies)
    pump.close()


@pytest.mark.usefixtures("pump")
def test_batches_of_one_queue_run_side_by_side_up_to_the_concurrency(world: World) -> None:
    """An SQS event source mapping invokes the function with several batches at once ("Using Lambda with Amazon
    SQS": Lambda scales up the pollers, five batches at once to begin with; maximum concurrency caps it)."""
    pump = world.pump(service=LambdaService(sqs_concurrency=3))
    world.send(world.queues.slow, [f"sleep 0.{i + 5}" for i in range(5)])

    # when one step takes what the concurrency allows
    assert pump.pump_queues() == 3

    # then three invocations overlapped, each with one message, and no more than three at once
    assert len(recorded.slow) == 3
    first_end = min(end for _, _, end in recorded.slow)
    assert all(start < first_end for _, start, _ in recorded.slow)
    assert pump.invocations.most_at_once["slow"] == 3
    pump.drain(timeout=20)
    assert len(recorded.slow) == 5
    pump.close()


def test_messages_of_a_handler_that_returns_are_deleted(world: World, pump: EventPump) -> None:
    # given
    world.send(world.queues.jobs, [f"job-{i}" for i in range(12)])

    # when
    pump.drain(timeout=20)

    # then neither visible nor in flight: gone, not merely hidden for the visibility timeout
    assert sorted(body for batch in recorded.batches for body in batch) == sorted(f"job-{i}" for i in range(12))
    assert world.counts(world.queues.jobs) == (0, 0)


def test_messages_of_a_handler_that_raises_stay_and_come_back_after_the_visibility_timeout(
    world: World, pump: EventPump
) -> None:
    # given
    bodies = ["fail-1", "fail-2", "fail-3"]
    world.send(world.queues.failing, bodies)

    # when the handler raises
    assert pump.pump_queues() == 3

    # then the batch is still on the queue, hidden for the visibility timeout, not deleted
    assert recorded.failed_batches == [bodies]
    assert world.counts(world.queues.failing) == (0, 3)
    assert pump.pump_queues() == 0
    assert len(recorded.failed_batches) == 1

    # and after the visibility timeout (1 s) the same messages are delivered again
    assert _eventually(lambda: pump.pump_queues() > 0, timeout=5)
    assert len(recorded.failed_batches) == 2
    assert sorted(recorded.failed_batches[1]) == sorted(bodies)


def test_messages_that_keep_failing_end_in_the_dead_letter_queue(world: World, pump: EventPump) -> None:
    # given a redrive policy with maxReceiveCount 2
    bodies = ["poison-1", "poison-2"]
    world.send(world.queues.failing, bodies)

    # when the pump keeps polling while the handler keeps raising
    def dead_lettered() -> bool:
        pump.pump_queues()
        return world.counts(world.queues.dlq) == (len(bodies), 0)

    assert _eventually(dead_lettered, timeout=10)

    # then the handler saw them maxReceiveCount times, and then they moved to the dead-letter queue
    assert [sorted(b) for b in recorded.failed_batches] == [sorted(bodies)] * MAX_RECEIVE_COUNT
    assert world.counts(world.queues.failing) == (0, 0)
    assert sorted(world.take_all(world.queues.dlq)) == sorted(bodies)


def test_a_failing_handler_does_not_hold_up_another_queue(world: World, pump: EventPump) -> None:
    # given
    world.send(world.queues.failing, ["bad"])
    world.send(world.queues.jobs, ["good"])

    # when
    pump.pump_queues()

    # then
    assert recorded.failed_batches == [["bad"]]
    assert recorded.batches == [["good"]]
    assert world.counts(world.queues.jobs) == (0, 0)
    assert sum(world.counts(world.queues.failing)) == 1  # in flight, or back once its 1 s visibility passed


# -- timeouts -----------------------------------------------------------------------------------------------------


def test_the_timeouts_are_the_functions_lambda_timeouts_in_the_chalice_config() -> None:
    timeouts = chalice_timeouts("dev")

    assert {name: timeouts[name] for name in ("scale_up", "instance_state", "reconcile")} == {
        "scale_up": 60.0,
        "instance_state": 30.0,
        "reconcile": 120.0,
    }
    assert LambdaService().timeout("scale_up") == 60.0


@pytest.mark.parametrize("what", ["sleep", "swallow", "thread"])
@pytest.mark.usefixtures("pump")
def test_a_function_past_its_timeout_makes_no_further_call_and_its_batch_stays(world: World, what: str) -> None:
    """Lambda stops a function at its timeout: the invocation fails and nothing after that point runs (Lambda
    Developer Guide, "Configure Lambda function timeout"). The sandbox stops it at its next call, even one made
    from a worker thread, even when the function catches every exception."""
    pump = world.pump(service=LambdaService(timeouts={"slow": 0.3}))
    world.send(world.queues.slow, [f"{what} 0.6"])

    # when the function sleeps past its timeout, then calls AWS
    assert pump.pump_queues() == 1

    # then the call never happened, the invocation failed as timed out, and the message stays for its retry (in
    # flight, or visible again once its one-second visibility timeout passed on a busy machine)
    assert recorded.calls_done == []
    assert pump.invocations.timed_out == {"slow": 1}
    assert sum(world.counts(world.queues.slow)) == 1
    pump.close()


@pytest.mark.usefixtures("pump")
def test_a_function_within_its_timeout_completes(world: World) -> None:
    pump = world.pump(service=LambdaService(timeouts={"slow": 5.0}))
    world.send(world.queues.slow, ["thread 0.1"])

    assert pump.pump_queues() == 1

    assert recorded.calls_done == ["thread 0.1"]
    assert pump.invocations.failed == {}
    assert world.counts(world.queues.slow) == (0, 0)
    pump.close()


# -- schedules ----------------------------------------------------------------------------------------------------


def test_tick_calls_the_scheduled_handler_with_a_scheduled_event(pump: EventPump) -> None:
    # given
    now = 1_700_000_000.0  # 2023-11-14T22:13:20Z

    # when
    fired = pump.tick(now=now)

    # then
    assert fired == 1
    [event] = recorded.ticks
    assert isinstance(event, CloudWatchEvent)
    assert event.detail_type == "Scheduled Event"
    assert event.source == "aws.events"
    assert event.account == ACCOUNT_ID
    assert event.time == "2023-11-14T22:13:20Z"
    assert event.detail == {}
    assert event.resources == [f"arn:aws:events:us-east-1:{ACCOUNT_ID}:rule/every_minute"]
    # nothing else was triggered by a tick
    assert recorded.batches == [] and recorded.events == []


def test_a_schedule_fires_on_time_while_its_last_invocation_still_runs(pump: EventPump) -> None:
    """A scheduled rule invokes its function asynchronously every period, whether or not the last invocation
    ended (EventBridge schedules do not wait for their targets)."""
    import threading

    recorded.tick_sleep = 0.8
    stop = threading.Event()
    loop = threading.Thread(target=pump.run, args=(stop,), kwargs={"interval": 0.05, "tick_every": 0.25})
    loop.start()
    try:
        assert _eventually(lambda: len(recorded.ticks) >= 3, timeout=10)
    finally:
        stop.set()
        loop.join()
    assert pump.invocations.most_at_once["every_minute"] >= 2


# -- EventBridge --------------------------------------------------------------------------------------------------


def test_an_event_matching_the_rule_reaches_the_cw_handler_and_another_does_not(world: World, pump: EventPump) -> None:
    # given
    events = world.clients.client("events")
    detail = {"instance-id": "i-123", "state": "terminated"}
    answer = events.put_events(
        Entries=[
            {"Source": "aws.ec2", "DetailType": STATE_CHANGE, "Detail": json.dumps(detail)},
            {
                "Source": "aws.ec2",
                "DetailType": "EC2 Spot Instance Interruption Warning",
                "Detail": json.dumps({"instance-id": "i-456", "instance-action": "terminate"}),
            },
        ]
    )
    assert answer["FailedEntryCount"] == 0

    # when
    pump.drain(timeout=10)

    # then only the state change matched moto's rule, delivered as a CloudWatchEvent with its account filled in
    [event] = recorded.events
    assert event.detail == detail
    assert event.detail_type == STATE_CHANGE
    assert event.source == "aws.ec2"
    assert event.account == ACCOUNT_ID
    # and it was consumed: pumping again delivers nothing more
    assert pump.pump_events() == 0
    assert len(recorded.events) == 1


def _put_state_changes(world: World, instance_id: str, states: list[str]) -> None:
    events = world.clients.client("events")
    for state in states:  # one PutEvents each, in this order
        detail = json.dumps({"instance-id": instance_id, "state": state})
        assert (
            events.put_events(Entries=[{"Source": "aws.ec2", "DetailType": STATE_CHANGE, "Detail": detail}])[
                "FailedEntryCount"
            ]
            == 0
        )


@pytest.mark.usefixtures("pump")
def test_a_share_of_events_is_delivered_twice(world: World) -> None:
    """EventBridge delivers each event at least once: a target may receive an event more than once ("Amazon
    EventBridge events": at-least-once delivery), which handlers must absorb."""
    pump = world.pump(service=LambdaService(duplicate_share=1.0, seed=7))
    _put_state_changes(world, "i-dup", ["terminated", "running"])

    assert pump.drain(timeout=10) == 2

    # then each event reached the handler twice, the same event id both times, and was consumed once
    ids = [event.to_dict()["id"] for event in recorded.events]
    assert len(ids) == 4 and len(set(ids)) == 2
    assert pump.invocations.duplicates == 2
    assert pump.pump_events() == 0
    pump.close()


@pytest.mark.usefixtures("pump")
def test_events_for_one_instance_arrive_out_of_order_within_the_reorder_window(world: World) -> None:
    """EventBridge does not promise order: each delivery here waits a random time within the window."""
    pump = world.pump(service=LambdaService(reorder_window=1.0, seed=11))
    states = ["pending", "running", "stopping", "stopped", "pending", "running", "shutting-down", "terminated"]
    _put_state_changes(world, "i-order", states)
    started = time.monotonic()

    pump.drain(timeout=15)

    arrived = [event.detail["state"] for event in recorded.events]
    assert sorted(arrived) == sorted(states)
    assert arrived != states
    assert time.monotonic() - started < 10
    pump.close()


def _put_failing_event(world: World) -> None:
    answer = world.clients.client("events").put_events(
        Entries=[{"Source": FAILING_SOURCE, "DetailType": "Test Failure", "Detail": json.dumps({"n": 1})}]
    )
    assert answer["FailedEntryCount"] == 0


def test_an_event_whose_handler_keeps_failing_is_tried_three_times_then_dropped(world: World, pump: EventPump) -> None:
    """EventBridge invokes a Lambda target asynchronously. "If the function returns an error, by default Lambda
    attempts to run it two more times, with a one-minute wait between the first two attempts, and two minutes
    between the second and third attempts"; then, with no failure destination or dead-letter queue, the event
    is discarded (https://docs.aws.amazon.com/lambda/latest/dg/invocation-async-error-handling.html; the limits,
    https://docs.aws.amazon.com/lambda/latest/dg/invocation-async-configuring.html: at most 2 retries, events
    kept at most 6 hours). Here the waits are shortened to 1 and 2 seconds; the pump's defaults are the real ones.
    """
    assert (ASYNC_RETRY_DELAYS, MAX_EVENT_AGE_SECONDS) == ((60, 120), 6 * 3600)
    quick = world.pump(event_retry_delays=(1, 2))
    _put_failing_event(world)

    # when the handler fails the first time
    assert quick.pump_events() == 1
    # then the event is not tried again before the first wait is over
    assert quick.pump_events() == 0
    assert len(recorded.failed_events) == 1

    # when the pump keeps polling
    def dropped() -> bool:
        quick.pump_events()
        return bool(quick.dropped_events)

    assert _eventually(dropped, timeout=15)

    # then the handler saw the same event three times, after the waits, and then it was dropped for good
    times = [at for at, _ in recorded.failed_events]
    ids = {event.to_dict()["id"] for _, event in recorded.failed_events}
    assert len(times) == 3 and len(ids) == 1
    assert times[1] - times[0] >= 0.9
    assert times[2] - times[1] >= 1.9
    assert quick.dropped_events == [
        DroppedEvent(
            handler="event_fails", event_id=ids.pop(), detail_type="Test Failure", attempts=3, reason="retry attempts"
        )
    ]
    url = world.sqs.get_queue_url(QueueName=f"{RULE_PREFIX}-rule-event_fails")["QueueUrl"]
    assert world.counts(url) == (0, 0)


def test_an_event_older_than_the_maximum_event_age_is_dropped_untried(world: World, pump: EventPump) -> None:
    """Lambda discards an event that waited in its asynchronous queue longer than the maximum event age (6 hours
    by default, https://docs.aws.amazon.com/lambda/latest/dg/invocation-async-configuring.html)."""
    # given a pump whose clock is past the event's age limit
    late = world.pump(clock=lambda: time.time() + MAX_EVENT_AGE_SECONDS + 60)
    _put_failing_event(world)

    # when
    assert late.pump_events() == 1

    # then the handler never ran, and the event is gone
    assert recorded.failed_events == []
    assert [(d.handler, d.attempts, d.reason) for d in late.dropped_events] == [("event_fails", 0, "maximum event age")]
    url = world.sqs.get_queue_url(QueueName=f"{RULE_PREFIX}-rule-event_fails")["QueueUrl"]
    assert world.counts(url) == (0, 0)


# -- drain --------------------------------------------------------------------------------------------------------


def test_drain_returns_once_the_queues_stay_empty(world: World, pump: EventPump) -> None:
    # given nothing to deliver
    started = time.monotonic()
    # when / then it returns promptly, having delivered nothing
    assert pump.drain(timeout=30, idle_rounds=3) == 0
    assert time.monotonic() - started < 10

    # given work on the queue
    world.send(world.queues.jobs, [f"late-{i}" for i in range(7)])
    started = time.monotonic()
    # when / then it delivers all of it and returns well before its timeout
    assert pump.drain(timeout=30, idle_rounds=3) == 7
    assert time.monotonic() - started < 10
    assert world.counts(world.queues.jobs) == (0, 0)
