"""EC2's DescribeInstances lags its launches: an instance RunInstances or CreateFleet just named can be missing
from DescribeInstances for a while; moto describes it at once.

Sources:

* "Eventual consistency in the Amazon EC2 API", https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html
  ("if you run a command to modify or describe the resource that you just created, its ID might not have
  propagated throughout the system, and you will get an error responding that the resource does not exist";
  ``InvalidInstanceID.NotFound`` after RunInstances, DescribeInstances among the commands it names).
* The DescribeInstances API reference, https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_DescribeInstances.html
  ("If you specify an instance ID that is not valid, an error is returned": the whole call fails, however many
  other ids it names), and the EC2 error codes,
  https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html (``InvalidInstanceID.NotFound``, a
  client error: HTTP 400). The message is moto's own wording for unknown instances, which is AWS's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection
from typing import Any
from xml.etree import ElementTree

from fleetctl.sandbox.aws_rules.support import LaggingRule, with_body
from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, Forward, aws_error

__all__ = ["DescribeInstancesLag", "not_found_message"]

NOT_FOUND_CODE = "InvalidInstanceID.NotFound"
_LAUNCHES = frozenset({"RunInstances", "CreateFleet"})
_INSTANCE_ID_PARAMETER = re.compile(r"InstanceId\.\d+$")


def not_found_message(instance_ids: Collection[str]) -> str:
    if len(instance_ids) > 1:
        return f"The instance IDs '{', '.join(instance_ids)}' do not exist"
    return f"The instance ID '{next(iter(instance_ids))}' does not exist"


class DescribeInstancesLag(LaggingRule):
    """DescribeInstances leaves out, for ``seconds`` after the launch answer named it, each instance a successful
    RunInstances or CreateFleet launched (per Region).

    An unfiltered or filtered call answers without it, and a reservation left with no instance is dropped; a
    call naming it in ``InstanceIds`` fails as a whole with ``InvalidInstanceID.NotFound`` naming the hidden
    ids. An instance is hidden from the moment its launch answer passes the shim, so a describe racing the
    launch answer itself may still see it. Only launches made while the lag is on are remembered.

    Other calls on a hidden instance (DescribeInstanceStatus, CreateTags, TerminateInstances...) are answered
    as moto answers them, which AWS may refuse for the same while: not modelled.

    ``POST /_shim/ec2-describe-lag/<action>``:

    * ``set`` ``{"seconds": 2.5}``: the lag (0, the default, turns the rule off and forgets the launches);
    * ``advance`` ``{"seconds": 3}``: moves this rule's clock, so a test can step past the lag;
    * ``status`` ``{}``: the lag, how many launched instances are remembered, how many times an instance was
      left out of an answer and how many calls failed for one.
    """

    name = "ec2-describe-lag"

    def __init__(self, *, seconds: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(seconds=seconds, clock=clock)
        self._launched: dict[tuple[str, str], float] = {}
        self.hidden = 0
        self.not_found = 0

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        if request.service != "ec2" or request.protocol != "query" or self._seconds <= 0:
            return forward(request)
        if request.operation in _LAUNCHES:
            response = forward(request)
            if response.status == 200:
                self._remember(request.region, _launched_ids(response.body))
            return response
        if request.operation != "DescribeInstances":
            return forward(request)
        response = forward(request)
        if response.status != 200:
            return response
        with self._lock:
            hidden = self._young(request.region)
        if not hidden:
            return response
        named = [value for key, value in request.pairs if _INSTANCE_ID_PARAMETER.match(key)]
        missing = [instance_id for instance_id in dict.fromkeys(named) if instance_id in hidden]
        if missing:
            with self._lock:
                self.not_found += 1
            return aws_error(request, NOT_FOUND_CODE, not_found_message(missing))
        body, left_out = _without_instances(response.body, hidden)
        if not left_out:
            return response
        with self._lock:
            self.hidden += left_out
        return with_body(response, body)

    def _remember(self, region: str, instance_ids: list[str]) -> None:
        with self._lock:
            now = self._now()
            for instance_id in instance_ids:
                self._launched[(region, instance_id)] = now

    def _young(self, region: str) -> set[str]:
        """The instance ids of ``region`` launched less than the lag ago; forgets the older ones. Lock held."""
        settled_before = self._now() - self._seconds
        self._launched = {key: at for key, at in self._launched.items() if at > settled_before}
        return {instance_id for (where, instance_id) in self._launched if where == region}

    def _forget(self) -> None:
        self._launched.clear()

    def _status(self) -> dict[str, Any]:
        young = sum(len(self._young(region)) for region in {where for where, _ in self._launched})
        return {"remembered": len(self._launched), "young": young, "hidden": self.hidden, "not_found": self.not_found}

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.hidden = 0
            self.not_found = 0


def _namespace_tag(root: ElementTree.Element) -> tuple[str, str]:
    namespace = root.tag.partition("}")[0].lstrip("{") if root.tag.startswith("{") else ""
    return namespace, f"{{{namespace}}}" if namespace else ""


def _launched_ids(body: bytes) -> list[str]:
    """The instance ids a RunInstances or CreateFleet answer names."""
    root = ElementTree.fromstring(body)  # noqa: S314 - moto's own answer, not outside input
    _, tag = _namespace_tag(root)
    # Paths, not a search for every <instanceId>: an instance item holds nested items of its own.
    found = [
        *(item.findtext(f"{tag}instanceId") for item in root.findall(f"{tag}instancesSet/{tag}item")),
        *(item.text for item in root.findall(f"{tag}fleetInstanceSet/{tag}item/{tag}instanceIds/{tag}item")),
    ]
    return [instance_id.strip() for instance_id in found if instance_id and instance_id.strip()]


def _without_instances(body: bytes, hidden: set[str]) -> tuple[bytes, int]:
    """A DescribeInstances answer without the ``hidden`` instances, and how many it left out; a reservation
    left with none is dropped."""
    root = ElementTree.fromstring(body)  # noqa: S314 - moto's own answer, not outside input
    namespace, tag = _namespace_tag(root)
    left_out = 0
    reservations = root.find(f"{tag}reservationSet")
    if reservations is None:
        return body, 0
    for reservation in reservations.findall(f"{tag}item"):
        instances = reservation.find(f"{tag}instancesSet")
        if instances is None:
            continue
        removed = [item for item in instances.findall(f"{tag}item") if _instance_id(item, tag) in hidden]
        for instance in removed:
            instances.remove(instance)
        left_out += len(removed)
        if removed and instances.find(f"{tag}item") is None:
            reservations.remove(reservation)
    if not left_out:
        return body, 0
    rewritten = ElementTree.tostring(root, encoding="utf-8", xml_declaration=True, default_namespace=namespace or None)
    return bytes(rewritten), left_out


def _instance_id(item: ElementTree.Element, tag: str) -> str:
    return (item.findtext(f"{tag}instanceId") or "").strip()
