"""The event pump: delivers SQS messages, schedule ticks and EventBridge events to the app's handlers.

``chalice local`` serves HTTP routes only. In AWS, Lambda's event-source mappings poll SQS and EventBridge
invokes functions; here the pump plays that part against moto: it reads the handlers the Chalice app
registered (``app.event_sources``), polls their queues, and gives each handler the event document Lambda would.
EventBridge matching is moto's own: every ``on_cw_event`` handler gets a real rule on the default bus whose
target is a local queue of its own, so the pump never second-guesses a pattern.

Lambda semantics are kept where they matter: a batch whose handler returns is deleted; one whose handler
raises stays on the queue and comes back after its visibility timeout (and reaches the dead-letter queue after
the redrive policy's receive count).

EventBridge invokes a Lambda target asynchronously, and Lambda's asynchronous invocation retries a function
error only twice, one minute and then two minutes later; then, with no failure destination or dead-letter
queue (runner-fleet's functions have none), the event is dropped. An event that waited longer than the maximum
event age (6 hours by default) is dropped without an attempt. The pump does the same, logs each drop and keeps
it in :attr:`EventPump.dropped_events`, so a handler that only works on a fourth try fails here too.
See https://docs.aws.amazon.com/lambda/latest/dg/invocation-async-error-handling.html.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from chalicelib.aws import AwsClients
from chalicelib.observability import logger

ACCOUNT_ID = "123456789012"
# Lambda's asynchronous invocation: the waits before the second and the third (last) attempt after a function
# error, and how long an event may wait in the queue at most (the defaults; MaximumRetryAttempts may only lower
# the retries, MaximumEventAgeInSeconds only lower the age).
ASYNC_RETRY_DELAYS = (60, 120)
MAX_EVENT_AGE_SECONDS = 6 * 3600


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
    ) -> None:
        self._app = app
        self._aws = clients
        self._rule_prefix = rule_prefix
        self._retry_delays = tuple(event_retry_delays)
        self._max_event_age = max_event_age
        self._clock = clock
        self._sqs: list[_Binding] = []
        self._rules: list[_Binding] = []
        self._schedules: list[tuple[str, Callable[[Any, Any], Any]]] = []
        self.dropped_events: list[DroppedEvent] = []

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

    # -- delivery ------------------------------------------------------------------------------------------

    def pump_queues(self) -> int:
        """One poll of every SQS-triggered handler's queue; returns how many messages were delivered."""
        delivered = 0
        for binding in self._sqs:
            messages = self._receive(binding)
            if not messages:
                continue
            event = {"Records": [self._sqs_record(binding, m) for m in messages]}
            if self._invoke(binding.name, binding.handler, event):
                self._delete(binding, messages)
            delivered += len(messages)
        return delivered

    def pump_events(self) -> int:
        """Deliver every EventBridge event that moto routed to each rule's queue (EventBridge does not batch)."""
        delivered = 0
        for binding in self._rules:
            while messages := self._receive(binding):
                delivered += self._deliver_events(binding, messages)
        return delivered

    def _deliver_events(self, binding: _Binding, messages: list[dict[str, Any]]) -> int:
        for message in messages:
            event = json.loads(message["Body"])
            # moto's EventBridge leaves out "account", which AWS always sends (and Chalice requires).
            event.setdefault("account", ACCOUNT_ID)
            attributes = message.get("Attributes", {})
            # Every receive of a rule's queue is one attempt: the receive count is the attempt number.
            attempt = int(attributes.get("ApproximateReceiveCount", "1"))
            sent = int(attributes.get("SentTimestamp", "0")) / 1000
            if sent and self._clock() - sent > self._max_event_age:
                self._drop(binding, message, event, attempt - 1, "maximum event age")
            elif self._invoke(binding.name, binding.handler, event):
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
        return len(messages)

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

    def tick(self, now: float | None = None) -> int:
        """Fire every scheduled handler once, as its EventBridge schedule would."""
        moment = time.gmtime(now if now is not None else time.time())
        for name, handler in self._schedules:
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
            self._invoke(name, handler, event)
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

    def run(self, stop: threading.Event, *, interval: float = 0.2, tick_every: float | None = None) -> None:
        """The sandbox's loop: poll continuously, and tick schedules every ``tick_every`` seconds when given (the
        scheduled handlers otherwise run only when ``tick`` is called)."""
        next_tick = time.monotonic()
        while not stop.is_set():
            if self._schedules and tick_every is not None and time.monotonic() >= next_tick:
                self.tick()
                next_tick = time.monotonic() + tick_every
            try:
                moved = self.pump_queues() + self.pump_events()
            except Exception:
                logger.exception("event pump poll failed")
                moved = 0
            if not moved:
                stop.wait(interval)

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

    @staticmethod
    def _invoke(name: str, handler: Callable[[Any, Any], Any], event: dict[str, Any]) -> bool:
        try:
            handler(event, LocalContext(function_name=f"runner-fleet-{name}"))
        except Exception:
            # Lambda would report the invocation failed and leave the batch on the queue.
            logger.exception("handler failed; its messages stay on the queue", extra={"handler": name})
            return False
        return True
