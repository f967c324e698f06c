"""What AWS sends EventBridge when an instance changes state, which moto does not: the sandbox sends it.

In AWS, terminating an instance (or the instance powering itself off) puts an "EC2 Instance State-change
Notification" on the default bus. moto terminates the instance but publishes nothing, so the sandbox, playing
the instance or AWS, terminates through the EC2 API and then puts the documented event itself; moto's
EventBridge routes it by the app's real rule to the instance-state handler.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

ACCOUNT_ID = "123456789012"


def state_change_entry(instance_id: str, state: str, region: str) -> dict[str, Any]:
    return {
        "Source": "aws.ec2",
        "DetailType": "EC2 Instance State-change Notification",
        "Detail": json.dumps({"instance-id": instance_id, "state": state}),
        "Resources": [f"arn:aws:ec2:{region}:{ACCOUNT_ID}:instance/{instance_id}"],
    }


def terminate_instances(ec2: Any, events: Any, instance_ids: Sequence[str]) -> None:
    """Terminate instances in EC2 and announce it on the default event bus, as AWS would."""
    ids = list(instance_ids)
    region = ec2.meta.region_name
    for start in range(0, len(ids), 100):
        ec2.terminate_instances(InstanceIds=ids[start : start + 100])
    for start in range(0, len(ids), 10):  # PutEvents takes at most 10 entries
        entries = [state_change_entry(i, "terminated", region) for i in ids[start : start + 10]]
        events.put_events(Entries=entries)
