"""EC2 puts an "EC2 Instance State-change Notification" on the default event bus for every state an instance
enters; moto puts none. This rule puts them, from the EC2 calls that change an instance's state, with EC2's lags.

Source: the EC2 User Guide, "Amazon EC2 instance state changes" (pending -> running; running -> stopping ->
stopped; -> shutting-down -> terminated) and "EventBridge events for Amazon EC2" (the notification's shape: source
``aws.ec2``, detail ``{"instance-id", "state"}``, one event per transition); EventBridge delivers each event at
least once and in no guaranteed order ("Amazon EventBridge events": "EventBridge ... makes a best effort to deliver
events in order" is not promised for targets), which the sandbox's event pump plays.

* RunInstances and an instant CreateFleet: ``pending`` at once, ``running`` after the boot lag;
* TerminateInstances: ``shutting-down`` at once, ``terminated`` after the termination lag, for each instance the
  call moved out of a live state (terminating an instance already terminated changes nothing and says nothing);
* StopInstances: ``stopping`` at once, ``stopped`` after the stop lag.

EC2's own lags are tens of seconds (an instance is ``pending`` while it boots, ``shutting-down`` while it shuts
down); the sandbox runs its instances' boots in about a second (``AgentOptions.boot_delay_seconds``), so its lags
are scaled alike and set with ``POST /_shim/ec2-state-events/set`` (``{"running_seconds", "terminated_seconds",
"stopped_seconds"}``). Events are put into moto's EventBridge in this process, so they reach the rules an
application made, exactly as a ``PutEvents`` would. ``POST /_shim/ec2-state-events/put`` lists what was put, and
``status`` the lags and how many events are still due; ``lose`` (``{"instance_ids": [...]}``) makes the events of
those instances never arrive, as when EventBridge drops them (a test's lost event).
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from typing import Any
from xml.etree import ElementTree

from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, Forward, Rule, ShimConfigError

__all__ = ["InstanceStateEvents"]

STATE_CHANGE = "EC2 Instance State-change Notification"
DEFAULT_LAGS = {"running_seconds": 0.5, "terminated_seconds": 1.0, "stopped_seconds": 1.0}
_LIVE = {"pending", "running", "stopping", "stopped", "shutting-down"}


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def launched_instances(body: bytes) -> list[str]:
    """Instance ids an answer of RunInstances (``instancesSet/item/instanceId``) or CreateFleet
    (``fleetInstanceSet/item/instanceIds/item``) names."""
    root = ElementTree.fromstring(body)  # noqa: S314 - moto's own answer, not outside input
    found = [e.text or "" for e in root.iter() if _local(e.tag) == "instanceId"]
    for element in root.iter():
        if _local(element.tag) == "instanceIds":
            found += [item.text or "" for item in element if item.text]
    return [i for i in dict.fromkeys(found) if i.startswith("i-")]


def _changed(body: bytes) -> list[tuple[str, str]]:
    """(instance id, previous state) of each instance a TerminateInstances or StopInstances answer lists."""
    root = ElementTree.fromstring(body)  # noqa: S314 - moto's own answer, not outside input
    changes = []
    for item in root.iter():
        children = {_local(child.tag): child for child in item}
        if "instanceId" in children and "previousState" in children:
            previous = next((e.text or "" for e in children["previousState"].iter() if _local(e.tag) == "name"), "")
            changes.append((children["instanceId"].text or "", previous))
    return changes


class InstanceStateEvents(Rule):
    name = "ec2-state-events"

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._lags = dict(DEFAULT_LAGS)
        self._due: list[tuple[float, int, str, dict[str, Any]]] = []
        self._order = itertools.count()
        self.put: list[dict[str, str]] = []
        self._lost: set[str] = set()
        self._worker = threading.Thread(target=self._deliver, name="ec2-state-events", daemon=True)
        self._worker.start()

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        response = forward(request)
        if request.service != "ec2" or response.status != 200:
            return response
        if request.operation in ("RunInstances", "CreateFleet"):
            for instance_id in launched_instances(response.body):
                self._schedule(request.region, instance_id, "pending", 0.0)
                self._schedule(request.region, instance_id, "running", self._lags["running_seconds"])
        elif request.operation == "TerminateInstances":
            for instance_id, previous in _changed(response.body):
                if previous in _LIVE and previous != "shutting-down":
                    self._schedule(request.region, instance_id, "shutting-down", 0.0)
                    self._schedule(request.region, instance_id, "terminated", self._lags["terminated_seconds"])
        elif request.operation == "StopInstances":
            for instance_id, previous in _changed(response.body):
                if previous in ("pending", "running"):
                    self._schedule(request.region, instance_id, "stopping", 0.0)
                    self._schedule(request.region, instance_id, "stopped", self._lags["stopped_seconds"])
        return response

    def configure(self, action: str, payload: dict[str, Any]) -> Any:
        if action == "set":
            unknown = set(payload) - set(DEFAULT_LAGS)
            if unknown:
                raise ShimConfigError(f"unknown lags {sorted(unknown)}; known: {sorted(DEFAULT_LAGS)}")
            values = {key: float(value) for key, value in payload.items()}
            if any(value < 0 for value in values.values()):
                raise ShimConfigError("lags are seconds, at least 0")
            with self._lock:
                self._lags.update(values)
                return dict(self._lags)
        if action == "lose":
            # EventBridge loses an event for good when its target keeps failing, or when a rule is disabled for a
            # while: the events of these instances are not put, from now on.
            with self._lock:
                self._lost.update(str(instance_id) for instance_id in payload["instance_ids"])
                return sorted(self._lost)
        if action == "put":
            with self._lock:
                return list(self.put)
        if action == "status":
            with self._lock:
                return {**self._lags, "due": len(self._due), "put": len(self.put)}
        return super().configure(action, payload)

    def reset(self) -> None:
        with self._lock:
            self._due.clear()
            self.put.clear()
            self._lost.clear()
            self._lags = dict(DEFAULT_LAGS)

    def _schedule(self, region: str, instance_id: str, state: str, delay: float) -> None:
        with self._lock:
            if instance_id in self._lost:
                return
            due = time.monotonic() + delay
            heapq.heappush(self._due, (due, next(self._order), region, self._entry(instance_id, state, region)))
            self._lock.notify()

    @staticmethod
    def _entry(instance_id: str, state: str, region: str) -> dict[str, Any]:
        from moto.core.models import DEFAULT_ACCOUNT_ID

        return {
            "Source": "aws.ec2",
            "DetailType": STATE_CHANGE,
            "Detail": json.dumps({"instance-id": instance_id, "state": state}),
            "Resources": [f"arn:aws:ec2:{region}:{DEFAULT_ACCOUNT_ID}:instance/{instance_id}"],
        }

    def _deliver(self) -> None:
        while True:
            with self._lock:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._lock.wait(timeout=None if not self._due else max(0.0, self._due[0][0] - time.monotonic()))
                _, _, region, entry = heapq.heappop(self._due)
            self._put(region, entry)

    def _put(self, region: str, entry: dict[str, Any]) -> None:
        from moto.core.models import DEFAULT_ACCOUNT_ID
        from moto.events.models import events_backends

        try:
            events_backends[DEFAULT_ACCOUNT_ID][region].put_events([entry])
        except Exception:
            # Never stop the worker over one event; a lost event is what reconcile exists for.
            return
        detail = json.loads(entry["Detail"])
        with self._lock:
            self.put.append({"instance_id": detail["instance-id"], "state": detail["state"], "region": region})
