"""EC2's state-change events, which the AWS shim puts for every call that changes an instance's state
(``fleetctl/sandbox/aws_rules/ec2_state_events.py``): EC2 User Guide, "Amazon EC2 instance state changes" and
"EventBridge events for Amazon EC2"."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chalicelib.aws import AwsClients
from fleetctl.sandbox.local_aws import LocalAws
from fleetctl.sandbox.network import create_sandbox_network, register_sandbox_amis

STATE_CHANGE = "EC2 Instance State-change Notification"


@pytest.fixture
def world(local_aws: LocalAws) -> Iterator[tuple[AwsClients, str, str, str]]:
    """A rule on the default bus sending every state change to a queue, as the app's instance-state rule does."""
    local_aws.reset()
    clients = AwsClients()
    queue = clients.sqs.create_queue(QueueName="state-changes")["QueueUrl"]
    arn = clients.sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events = clients.client("events")
    events.put_rule(Name="states", EventPattern=json.dumps({"source": ["aws.ec2"], "detail-type": [STATE_CHANGE]}))
    events.put_targets(Rule="states", Targets=[{"Id": "q", "Arn": arn}])
    network = create_sandbox_network(clients.ec2)
    image = register_sandbox_amis(clients.ssm, clients.ec2, "/state-events/ami")["x86_64"]
    yield clients, queue, network.subnet_ids[0], image


def _states(clients: AwsClients, queue: str, wanted: int, timeout: float = 10.0) -> list[tuple[str, str]]:
    """(instance id, state) of the events delivered, in arrival order, once ``wanted`` arrived (or the timeout)."""
    found: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout
    while len(found) < wanted and time.monotonic() < deadline:
        for message in clients.sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get(
            "Messages", []
        ):
            event: dict[str, Any] = json.loads(message["Body"])
            assert event["source"] == "aws.ec2" and event["detail-type"] == STATE_CHANGE
            found.append((event["detail"]["instance-id"], event["detail"]["state"]))
            clients.sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
    return found


def test_a_launch_puts_pending_then_running_and_a_termination_shutting_down_then_terminated(
    world: tuple[AwsClients, str, str, str], local_aws: LocalAws
) -> None:
    clients, queue, subnet, image = world
    local_aws.shim("ec2-state-events", "set", running_seconds=0.3, terminated_seconds=0.6)

    # when an instance is launched, then terminated
    [instance] = clients.ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet)["Instances"]
    instance_id = instance["InstanceId"]
    assert _states(clients, queue, 2) == [(instance_id, "pending"), (instance_id, "running")]
    started = time.monotonic()
    clients.ec2.terminate_instances(InstanceIds=[instance_id])

    # then shutting-down at once, terminated after the lag
    assert _states(clients, queue, 2) == [(instance_id, "shutting-down"), (instance_id, "terminated")]
    assert time.monotonic() - started >= 0.6

    # and terminating it again changes no state, so nothing more is put
    clients.ec2.terminate_instances(InstanceIds=[instance_id])
    assert _states(clients, queue, 1, timeout=2.0) == []


def test_a_fleet_launch_puts_each_instances_events(world: tuple[AwsClients, str, str, str]) -> None:
    clients, queue, subnet, image = world
    clients.ec2.create_launch_template(LaunchTemplateName="state-events", LaunchTemplateData={"ImageId": image})
    answer = clients.ec2.create_fleet(
        Type="instant",
        TargetCapacitySpecification={"TotalTargetCapacity": 2, "DefaultTargetCapacityType": "on-demand"},
        LaunchTemplateConfigs=[
            {
                "LaunchTemplateSpecification": {"LaunchTemplateName": "state-events", "Version": "$Default"},
                "Overrides": [{"InstanceType": "m5.large", "SubnetId": subnet}],
            }
        ],
    )
    launched = sorted(i for group in answer["Instances"] for i in group["InstanceIds"])

    states = _states(clients, queue, 4)

    assert sorted(states) == sorted((i, s) for i in launched for s in ("pending", "running"))


def test_a_stop_puts_stopping_then_stopped(world: tuple[AwsClients, str, str, str]) -> None:
    clients, queue, subnet, image = world
    [instance] = clients.ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet)["Instances"]
    _states(clients, queue, 2)

    clients.ec2.stop_instances(InstanceIds=[instance["InstanceId"]])

    assert [state for _, state in _states(clients, queue, 2)] == ["stopping", "stopped"]


def test_the_lags_are_settable_and_checked(local_aws: LocalAws) -> None:
    assert local_aws.shim("ec2-state-events", "set", running_seconds=2) == {
        "running_seconds": 2.0,
        "terminated_seconds": 1.0,
        "stopped_seconds": 1.0,
    }
    with pytest.raises(ValueError, match="unknown lags"):
        local_aws.shim("ec2-state-events", "set", boot_seconds=2)
    with pytest.raises(ValueError, match="at least 0"):
        local_aws.shim("ec2-state-events", "set", running_seconds=-1)
    local_aws.reset()
