"""The event pump: delivers SQS messages, schedule ticks and EventBridge events to the app's handlers, as Lambda
runs them.

``chalice local`` serves HTTP routes only. In AWS, Lambda's event-source mappings poll SQS and EventBridge
invokes functions; here the pump plays that part against moto: it reads the handlers the Chalice app
registered (``app.event_sources``), polls their queues, and gives each handler the event document Lambda would.
EventBridge matching is moto's own: every ``on_cw_event`` handler gets a real rule on the default bus whose
target is a local queue of its own, so the pump never second-guesses a pattern.

Lambda semantics are kept where they matter (:class:`LambdaService` holds the settings):

* **Side by side.** Each function gets its own invocations, concurrently: an SQS event source mapping runs up to
  ``sqs_concurrency`` batches at once (Lambda scales SQS pollers up from five concurrent batches, "Using Lambda
  with Amazon SQS": scaling; ``maximum_concurrency`` caps it), EventBridge invokes its targets asynchronously, one
  invocation per event, concurrently, and a schedule fires on time whether or not its last invocation ended
  (a scheduled rule invokes asynchronously too).
* **Timeouts.** Each invocation is stopped at its function's ``lambda_timeout`` from ``.chalice/config.json``
  (``fleetctl.sandbox.lambda_runtime``: at its next AWS or GitLab call, and failed if it returns late).
* **SQS.** A batch whose handler returns is deleted; one whose handler raises or times out stays on the queue
  and comes back after its visibility timeout (and reaches the dead-letter queue after the redrive policy's
  receive count).
* **EventBridge is at least once, in no promised order** ("Amazon EventBridge event delivery": at-least-once;
  events are not guaranteed to arrive in order). A settable share of events is delivered twice
  (``duplicate_share``), and each delivery waits a random time up to ``reorder_window`` seconds, so events for
  one instance arrive out of order within that window.
* **Asynchronous invocation retries.** Lambda retries a function error of an asynchronous invocation only twice,
  one minute and then two minutes later; then, with no failure destination or dead-letter queue (runner-fleet's
  functions have none), the event is dropped. An event that waited longer than the maximum event age (6 hours by
  default) is dropped without an attempt. The pump does the same, logs each drop and keeps it in
  :attr:`EventPump.dropped_events`, so a handler that only works on a fourth try fails here too.
  See https://docs.aws.amazon.com/lambda/latest/dg/invocation-async-error-handling.html.

The step methods (:meth:`EventPump.pump_queues`, :meth:`~EventPump.pump_events`, :meth:`~EventPump.tick`,
:meth:`~EventPump.drain`) start invocations side by side and return once those ended, so a test can drive the
pump step by step; :meth:`EventPump.run` is the sandbox's loop, which never waits for an invocation to end
before starting the next.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chalicelib.aws import AwsClients
from chalicelib.observability import logger
from fleetctl.sandbox.lambda_runtime import InvocationTimedOut, invocation

ACCOUNT_ID = "123456789012"
# Lambda's asynchronous invocation: the waits before the second and the third (last) attempt after a function
# error, and how long an event may wait in the queue at most (the defaults; MaximumRetryAttempts may only lower
# the retries, MaximumEventAgeInSeconds only lower the age).
ASYNC_RETRY_DELAYS = (60, 120)
MAX_EVENT_AGE_SECONDS = 6 * 3600
# Lambda's default timeout, for a function .chalice/config.json gives none.
DEFAULT_TIMEOUT_SECONDS = 3.0
CHALICE_CONFIG = Path(__file__).resolve().parents[2] / ".chalice" / "config.json"


def chalice_timeouts(stage: str = "dev", config_file: Path = CHALICE_CONFIG) -> dict[str, float]:
    """Each function's ``lambda_timeout`` in the stage's ``lambda_functions`` of ``.chalice/config.json``."""
    config = json.loads(config_file.read_text())
    functions = config.get("stages", {}).get(stage, {}).get("lambda_functions", {})
    default = float(config.get("stages", {}).get(stage, {}).get("lambda_timeout", DEFAULT_TIMEOUT_SECONDS))
    timeouts = {name: float(settings.get("lambda_timeout", default)) for name, settings in functions.items()}
    timeouts.setdefault("*", default)
    return timeouts


@dataclass(frozen=True)
class LambdaService:
    """How the sandbox's Lambda runs the app's functions (see the module docstring)."""

    timeouts: Mapping[str, float] = field(default_factory=chalice_timeouts)
    sqs_concurrency: int = 5
    event_concurrency: int = 16
    duplicate_share: float = 0.0
    reorder_window: float = 0.0
    seed: int | None = None

    def timeout(self, function: str) -> float:
        return float(self.timeouts.get(function, self.timeouts.get("*", DEFAULT_TIMEOUT_SECONDS)))


@dataclass(frozen=True)
class DroppedEvent:
    """An EventBridge event Lambda would have discarded: its handler, the event's id, the attempts made, why."""

    handler: str
    event_id: str
    detail_type: str
    attempts: int
    reason: str


@dataclass
class LocalContext:
    """The parts of a Lambda context object that Chalice and Powertools read."""

    function_name: str
    memory_limit_in_mb: int = 256
    aws_request_id: str = ""
    timeout_seconds: float = 60.0

    def __post_init__(self) -> None:
        self.aws_request_id = self.aws_request_id or str(uuid.uuid4())
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:{ACCOUNT_ID}:function:{self.function_name}"
        self.function_version = "$LATEST"
        self.log_group_name = f"/aws/lambda/{self.function_name}"
        self.log_stream_name = "local"
        self._deadline = time.monotonic() + self.timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


@dataclass(frozen=True)
class _Binding:
    name: str
    handler: Callable[[Any, Any], Any]
    queue_url: str
    queue_arn: str
    batch_size: int


@dataclass
class Invocations:
    """What the pump started, by function: invocations, failures (errors and timeouts) and timeouts alone."""

    started: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    timed_out: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    most_at_once: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "started": dict(self.started),
            "failed": dict(self.failed),
            "timed_out": dict(self.timed_out),
            "duplicates": self.duplicates,
            "most_at_once": dict(self.most_at_once),
        }


class EventPump:
    def __init__(
        self,
        app: Any,
        clients: AwsClients,
        *,
        rule_prefix: str = "sandbox",
        event_retry_delays: Sequence[int] = ASYNC_RETRY_DELAYS,
        max_event_age: float = MAX_EVENT_AGE_SECONDS,
        clock: Callable[[], float] = time.time,
        service: LambdaService | None = None,
    ) -> None:
        self._app = app
        self._aws = clients
        self._rule_prefix = rule_prefix
        self._retry_delays = tuple(event_retry_delays)
        self._max_event_age = max_event_age
        self._clock = clock
        self.service = service or LambdaService()
        self._random = random.Random(self.service.seed)
        self._sqs: list[_Binding] = []
        self._rules: list[_Binding] = []
        self._schedules: list[tuple[str, Callable[[Any, Any], Any]]] = []
        self.dropped_events: list[DroppedEvent] = []
        self.invocations = Invocations()
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        # One pool per kind of event source: a busy kind never starves another, as separate functions in Lambda.
        self._sqs_pool = ThreadPoolExecutor(self.service.sqs_concurrency, thread_name_prefix="lambda-sqs")
        self._event_pool = ThreadPoolExecutor(self.service.event_concurrency, thread_name_prefix="lambda-event")
        self._schedule_pool = ThreadPoolExecutor(8, thread_name_prefix="lambda-schedule")
        self._in_flight: dict[str, set[Future[bool]]] = {}

    def set_service(self, service: LambdaService) -> None:
        """Change the duplicate share, reorder window and timeouts from now on (concurrency is fixed at start)."""
        self.service = service
        self._random = random.Random(service.seed)

    def connect(self) -> EventPump:
        """Find the app's event handlers; create the EventBridge rules and their delivery queues."""
        from chalice.app import CloudWatchEventConfig, ScheduledEventConfig, SQSEventConfig

        sqs = self._aws.sqs
        for source in self._app.event_sources:
            handler = self._app.handler_map[source.name]
            if isinstance(source, SQSEventConfig):
                url = sqs.get_queue_url(QueueName=source.queue)["QueueUrl"]
                self._sqs.append(_Binding(source.name, handler, url, self._arn(url), source.batch_size))
            elif isinstance(source, ScheduledEventConfig):
                self._schedules.append((source.name, handler))
            elif isinstance(source, CloudWatchEventConfig):
                self._rules.append(self._bind_rule(source.name, handler, source.event_pattern))
        return self

    def close(self) -> None:
        """Wait for the invocations under way, then stop the pools."""
        for pool in (self._sqs_pool, self._event_pool, self._schedule_pool):
            pool.shutdown(wait=True)

    def _bind_rule(self, name: str, handler: Callable[[Any, Any], Any], pattern: dict[str, Any]) -> _Binding:
        queue_name = f"{self._rule_prefix}-rule-{name}"
        url = self._aws.sqs.create_queue(QueueName=queue_name)["QueueUrl"]
        arn = self._arn(url)
        events = self._aws.client("events")
        rule_name = f"{self._rule_prefix}-{name}"
        events.put_rule(Name=rule_name, EventPattern=json.dumps(pattern), State="ENABLED")
        events.put_targets(Rule=rule_name, Targets=[{"Id": "pump", "Arn": arn}])
        return _Binding(name, handler, url, arn, 10)

    def _arn(self, url: str) -> str:
        attributes = self._aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return str(attributes["Attributes"]["QueueArn"])

    # -- steps: start invocations side by side, return once they ended --------------------------------------

    def pump_queues(self) -> int:
        """Up to ``sqs_concurrency`` batches of every SQS-triggered handler's queue, invoked side by side;
        returns how many messages were delivered."""
        delivered = 0
        started: list[Future[bool]] = []
        for binding in self._sqs:
            for _ in range(self.service.sqs_concurrency):
                messages = self._receive(binding)
                if not messages:
                    break
                started.append(self._sqs_pool.submit(self._run_batch, binding, messages))
                delivered += len(messages)
        wait(started)
        return delivered

    def running(self, function: str) -> int:
        """Invocations of ``function`` under way now."""
        with self._lock:
            return self._running.get(function, 0)

    def pump_events(self) -> int:
        """Deliver every EventBridge event that moto routed to each rule's queue, each in an invocation of its own,
        side by side (EventBridge does not batch)."""
        delivered = 0
        started: list[Future[Any]] = []
        for binding in self._rules:
            while messages := self._receive(binding):
                for message in messages:
                    started += self._dispatch_event(binding, message)
                delivered += len(messages)
        wait(started)
        return delivered

    def tick(self, now: float | None = None) -> int:
        """Fire every scheduled handler once, as its EventBridge schedule would, and wait for them."""
        wait([self._schedule_pool.submit(self._fire, name, handler, now) for name, handler in self._schedules])
        return len(self._schedules)

    def drain(self, timeout: float = 30.0, idle_rounds: int = 3) -> int:
        """Pump until every queue stays empty for ``idle_rounds`` polls in a row (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        total, idle = 0, 0
        while time.monotonic() < deadline and idle < idle_rounds:
            moved = self.pump_queues() + self.pump_events()
            total += moved
            idle = 0 if moved else idle + 1
        return total

    # -- the sandbox's loop: invocations start without waiting for the last to end ---------------------------

    def run(self, stop: threading.Event, *, interval: float = 0.2, tick_every: float | None = None) -> None:
        """Poll continuously, and fire the schedules every ``tick_every`` seconds when given (the scheduled
        handlers otherwise run only when ``tick`` is called), each firing in an invocation of its own even while
        the last one still runs."""
        next_tick = time.monotonic()
        while not stop.is_set():
            if self._schedules and tick_every is not None and time.monotonic() >= next_tick:
                for name, handler in self._schedules:
                    self._schedule_pool.submit(self._fire, name, handler, None)
                next_tick = time.monotonic() + tick_every
            try:
                moved = self._start_batches() + self._start_events()
            except Exception:
                logger.exception("event pump poll failed")
                moved = 0
            if not moved:
                stop.wait(interval)

    def _start_batches(self) -> int:
        moved = 0
        for binding in self._sqs:
            running = self._in_flight.setdefault(binding.name, set())
            running -= {future for future in running if future.done()}
            while len(running) < self.service.sqs_concurrency:
                messages = self._receive(binding)
                if not messages:
                    break
                running.add(self._sqs_pool.submit(self._run_batch, binding, messages))
                moved += len(messages)
        return moved

    def _start_events(self) -> int:
        moved = 0
        for binding in self._rules:
            while messages := self._receive(binding):
                for message in messages:
                    self._dispatch_event(binding, message)
                moved += len(messages)
        return moved

    # -- one invocation --------------------------------------------------------------------------------------

    def _run_batch(self, binding: _Binding, messages: list[dict[str, Any]]) -> bool:
        event = {"Records": [self._sqs_record(binding, m) for m in messages]}
        if self._invoke(binding.name, binding.handler, event):
            self._delete(binding, messages)
            return True
        return False

    def _fire(self, name: str, handler: Callable[[Any, Any], Any], now: float | None) -> bool:
        moment = time.gmtime(now if now is not None else self._clock())
        event = {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "account": ACCOUNT_ID,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", moment),
            "region": "us-east-1",
            "resources": [f"arn:aws:events:us-east-1:{ACCOUNT_ID}:rule/{name}"],
            "detail": {},
        }
        return self._invoke(name, handler, event)

    def _dispatch_event(self, binding: _Binding, message: dict[str, Any]) -> list[Future[Any]]:
        """Start the event's invocation (and a duplicate of it, for the configured share), each after its own
        random wait within the reorder window. The message stays invisible while they run."""
        service = self.service
        with self._lock:
            delays = [self._random.uniform(0, service.reorder_window) if service.reorder_window else 0.0]
            if service.duplicate_share and self._random.random() < service.duplicate_share:
                delays.append(self._random.uniform(0, service.reorder_window) if service.reorder_window else 0.0)
                self.invocations.duplicates += 1
        # Invisible until every delivery had its wait and its whole timeout: no other poll takes it meanwhile.
        hold = int(max(delays) + service.timeout(binding.name)) + 5
        self._aws.sqs.change_message_visibility(
            QueueUrl=binding.queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=min(hold, 43_200)
        )
        futures = [self._event_pool.submit(self._deliver_event, binding, message, delays[0], True)]
        futures += [self._event_pool.submit(self._deliver_event, binding, message, d, False) for d in delays[1:]]
        return futures

    def _deliver_event(self, binding: _Binding, message: dict[str, Any], delay: float, accountable: bool) -> None:
        """One delivery of an event. Only the first delivery of a message accounts for it (deletes it, or puts it
        back for Lambda's next attempt, or drops it); a duplicate only invokes."""
        if delay:
            time.sleep(delay)
        event = json.loads(message["Body"])
        # moto's EventBridge leaves out "account", which AWS always sends (and Chalice requires).
        event.setdefault("account", ACCOUNT_ID)
        attributes = message.get("Attributes", {})
        # Every receive of a rule's queue is one attempt: the receive count is the attempt number.
        attempt = int(attributes.get("ApproximateReceiveCount", "1"))
        sent = int(attributes.get("SentTimestamp", "0")) / 1000
        if sent and self._clock() - sent > self._max_event_age:
            if accountable:
                self._drop(binding, message, event, attempt - 1, "maximum event age")
            return
        ok = self._invoke(binding.name, binding.handler, event)
        if not accountable:
            return
        if ok:
            self._delete(binding, [message])
        elif attempt > len(self._retry_delays):
            self._drop(binding, message, event, attempt, "retry attempts")
        else:
            # Back on the queue, invisible until Lambda's next attempt is due.
            self._aws.sqs.change_message_visibility(
                QueueUrl=binding.queue_url,
                ReceiptHandle=message["ReceiptHandle"],
                VisibilityTimeout=self._retry_delays[attempt - 1],
            )

    def _drop(
        self, binding: _Binding, message: dict[str, Any], event: dict[str, Any], attempts: int, reason: str
    ) -> None:
        dropped = DroppedEvent(
            handler=binding.name,
            event_id=str(event.get("id", "")),
            detail_type=str(event.get("detail-type", "")),
            attempts=attempts,
            reason=reason,
        )
        with self._lock:
            self.dropped_events.append(dropped)
        self._delete(binding, [message])
        # Lambda counts these in its AsyncEventsDropped metric; with no failure destination the event is gone.
        logger.error(
            "EventBridge event dropped, as Lambda drops it",
            extra={
                "handler": dropped.handler,
                "event_id": dropped.event_id,
                "detail_type": dropped.detail_type,
                "attempts": dropped.attempts,
                "reason": dropped.reason,
            },
        )

    def _receive(self, binding: _Binding) -> list[dict[str, Any]]:
        """Up to the handler's batch size, as Lambda's batching window gathers it (SQS gives 10 per call)."""
        batch: list[dict[str, Any]] = []
        while len(batch) < binding.batch_size:
            found = self._aws.sqs.receive_message(
                QueueUrl=binding.queue_url,
                MaxNumberOfMessages=min(binding.batch_size - len(batch), 10),
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
                WaitTimeSeconds=0,
            )
            messages = found.get("Messages", [])
            if not messages:
                break
            batch.extend(messages)
        return batch

    def _delete(self, binding: _Binding, messages: list[dict[str, Any]]) -> None:
        for start in range(0, len(messages), 10):  # DeleteMessageBatch takes at most 10 entries
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages[start : start + 10])
            ]
            self._aws.sqs.delete_message_batch(QueueUrl=binding.queue_url, Entries=entries)

    @staticmethod
    def _sqs_record(binding: _Binding, message: dict[str, Any]) -> dict[str, Any]:
        return {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": message.get("Attributes", {}),
            "messageAttributes": message.get("MessageAttributes", {}),
            "md5OfBody": message.get("MD5OfBody", ""),
            "eventSource": "aws:sqs",
            "eventSourceARN": binding.queue_arn,
            "awsRegion": "us-east-1",
        }

    def _invoke(self, name: str, handler: Callable[[Any, Any], Any], event: dict[str, Any]) -> bool:
        """One invocation of ``name``, stopped at its timeout; False when it failed (raised or timed out)."""
        timeout = self.service.timeout(name)
        with self._lock:
            self.invocations.started[name] = self.invocations.started.get(name, 0) + 1
            self._running[name] = self._running.get(name, 0) + 1
            most = self.invocations.most_at_once
            most[name] = max(most.get(name, 0), self._running[name])
        try:
            with invocation(name, timeout):
                handler(event, LocalContext(function_name=f"runner-fleet-{name}", timeout_seconds=timeout))
        except InvocationTimedOut as exc:
            self._count_failure(name, timed_out=True)
            logger.error("handler timed out; Lambda stopped it", extra={"handler": name, "error": str(exc)})
            return False
        except Exception:
            self._count_failure(name)
            # Lambda would report the invocation failed and leave the batch on the queue.
            logger.exception("handler failed; its messages stay on the queue", extra={"handler": name})
            return False
        finally:
            with self._lock:
                self._running[name] -= 1
        return True

    def _count_failure(self, name: str, *, timed_out: bool = False) -> None:
        with self._lock:
            self.invocations.failed[name] = self.invocations.failed.get(name, 0) + 1
            if timed_out:
                self.invocations.timed_out[name] = self.invocations.timed_out.get(name, 0) + 1
