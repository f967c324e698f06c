"""What EC2 sends EventBridge about instances, played in the sandbox.

State changes are the AWS shim's (``fleetctl.sandbox.aws_rules.ec2_state_events``): every call that changes an
instance's state, whoever makes it, puts EC2's "EC2 Instance State-change Notification" events on the default bus,
with EC2's lags, and moto's EventBridge routes them by the app's real rule to the instance-state handler. So the
sandbox, playing an instance that powers itself off, only terminates it through the EC2 API (shutdown behaviour
terminate), and the events follow.

Spot interruptions are not calls anybody makes: EC2 puts an "EC2 Spot Instance Interruption Warning" two minutes
before it interrupts a spot instance, and an "EC2 Instance Rebalance Recommendation" when the instance is at
elevated risk of interruption (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html,
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/rebalance-recommendations.html). The sandbox puts them in
their documented shapes, and :func:`interrupt_spot_instance` plays the whole interruption.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

ACCOUNT_ID = "123456789012"
SPOT_INTERRUPTION_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE_RECOMMENDATION = "EC2 Instance Rebalance Recommendation"
# How long EC2 warns before it interrupts a spot instance.
INTERRUPTION_NOTICE_SECONDS = 120.0


def state_change_entry(instance_id: str, state: str, region: str) -> dict[str, Any]:
    return {
        "Source": "aws.ec2",
        "DetailType": "EC2 Instance State-change Notification",
        "Detail": json.dumps({"instance-id": instance_id, "state": state}),
        "Resources": [f"arn:aws:ec2:{region}:{ACCOUNT_ID}:instance/{instance_id}"],
    }


def terminate_instances(ec2: Any, instance_ids: Sequence[str]) -> None:
    """Terminate instances in EC2 (100 a call); their state-change events follow from the AWS shim."""
    ids = list(instance_ids)
    for start in range(0, len(ids), 100):
        ec2.terminate_instances(InstanceIds=ids[start : start + 100])


def interruption_warning_entry(instance_id: str, region: str, action: str = "terminate") -> dict[str, Any]:
    """The warning's PutEvents entry; ``action`` is what EC2 will do: hibernate, stop or terminate."""
    return {
        "Source": "aws.ec2",
        "DetailType": SPOT_INTERRUPTION_WARNING,
        "Detail": json.dumps({"instance-id": instance_id, "instance-action": action}),
        "Resources": [f"arn:aws:ec2:{region}:{ACCOUNT_ID}:instance/{instance_id}"],
    }


def rebalance_recommendation_entry(instance_id: str, region: str) -> dict[str, Any]:
    return {
        "Source": "aws.ec2",
        "DetailType": REBALANCE_RECOMMENDATION,
        "Detail": json.dumps({"instance-id": instance_id}),
        "Resources": [f"arn:aws:ec2:{region}:{ACCOUNT_ID}:instance/{instance_id}"],
    }


def warn_of_interruption(ec2: Any, events: Any, instance_id: str) -> None:
    """Put EC2's spot interruption warning for ``instance_id`` on the default bus."""
    events.put_events(Entries=[interruption_warning_entry(instance_id, ec2.meta.region_name)])


def recommend_rebalance(ec2: Any, events: Any, instance_id: str) -> None:
    """Put EC2's rebalance recommendation for ``instance_id`` on the default bus."""
    events.put_events(Entries=[rebalance_recommendation_entry(instance_id, ec2.meta.region_name)])


def interrupt_spot_instance(
    ec2: Any,
    events: Any,
    instance_id: str,
    *,
    notice_seconds: float = INTERRUPTION_NOTICE_SECONDS,
    shut_down: Callable[[str], object] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Interrupt a spot instance as EC2 does: the warning, ``notice_seconds`` later the instance's operating system
    shuts down (``shut_down`` plays what runs on it, such as the runner agent stopping), then the instance is
    terminated and the state-change event put. Blocks for the notice; run it in a thread to watch meanwhile."""
    warn_of_interruption(ec2, events, instance_id)
    sleep(notice_seconds)
    if shut_down is not None:
        shut_down(instance_id)
    terminate_instances(ec2, [instance_id])
