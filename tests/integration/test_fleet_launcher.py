"""Launching runners with CreateFleet against moto server, with capacity and throttling faults at the wire.

Each test uses its own launch id and counts what exists in moto by the launch-id tag, so tests share one
moto server, VPC and launch template without seeing each other's instances.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from chalicelib.aws import AwsClients
from chalicelib.config import PoolConfig, parse_config
from chalicelib.errors import RetryableError
from chalicelib.scaling.fleet import (
    TAG_FLEET,
    TAG_LAUNCH,
    TAG_POOL,
    FleetLauncher,
    LaunchRefusedError,
    LaunchTemplateRef,
    Lifecycle,
)
from fleetctl.sandbox.local_aws import LocalAws
from tests.faults import SimulatedCrash, WireFaults

pytestmark = pytest.mark.timeout(120)

# One of moto's Amazon Linux images; a listing of every Amazon image is large enough to time out a busy machine.
AL2023 = [{"Name": "name", "Values": ["al2023-ami-2023*"]}]


FLEET = "runner-fleet-test"
TYPES = ["m7i.large", "m6i.large", "m5.large"]


@dataclass(frozen=True)
class Network:
    subnets: tuple[str, str]
    security_group: str
    template: LaunchTemplateRef


@pytest.fixture(scope="module")
def ec2(local_aws: LocalAws) -> Any:
    return AwsClients().ec2


@pytest.fixture(scope="module")
def network(ec2: Any) -> Network:
    # An account that has launched spot before (or was bootstrapped) has EC2 Spot's service-linked role.
    AwsClients().client("iam").create_service_linked_role(AWSServiceName="spot.amazonaws.com")
    image = ec2.describe_images(Owners=["amazon"], Filters=AL2023)["Images"][0]["ImageId"]
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = tuple(
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{n}.0/24", AvailabilityZone=f"us-east-1{zone}")["Subnet"][
            "SubnetId"
        ]
        for n, zone in ((1, "a"), (2, "b"))
    )
    group = ec2.create_security_group(GroupName="runners", Description="egress only", VpcId=vpc)["GroupId"]
    ec2.create_launch_template(
        LaunchTemplateName="runner-fleet-test-docker",
        LaunchTemplateData={
            "ImageId": image,
            "SecurityGroupIds": [group],
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
        },
    )
    return Network(
        subnets=(subnets[0], subnets[1]),
        security_group=group,
        template=LaunchTemplateRef("runner-fleet-test-docker"),
    )


@pytest.fixture
def faults(ec2: Any) -> Iterator[WireFaults]:
    with WireFaults(ec2) as injected:
        yield injected


@pytest.fixture
def launcher(ec2: Any) -> FleetLauncher:
    return FleetLauncher(ec2, fleet=FLEET)


def make_pool(network: Network, **overrides: Any) -> PoolConfig:
    pool: dict[str, Any] = {
        "name": "docker",
        "tags": ["docker"],
        "instance_types": TYPES,
        "subnets": list(network.subnets),
        "security_groups": [network.security_group],
        "max_runners": 20,
        "image": {"repository": "ci/build-base"},
        **overrides,
    }
    config = parse_config(
        {
            "fleet": FLEET,
            "gitlab": {"url": "https://gitlab.example.com", "token_parameter": "/runner-fleet/test/gitlab-token"},
            "webhook": {"token_parameter": "/runner-fleet/test/webhook-token"},
            "state": {"table": "fleet", "jobs_queue": "jobs", "dead_letter_queue": "jobs-dlq"},
            "cache_bucket": "runner-fleet-test-cache",
            "ami_parameter": "/runner-fleet/test/runner-ami",
            "pools": [pool],
        }
    )
    return config.pools[0]


def new_launch_id() -> str:
    return f"launch-{uuid.uuid4()}"


def live_instances(ec2: Any, launch_id: str) -> list[dict[str, Any]]:
    """What a user would see in the EC2 console: live instances carrying the launch id."""
    found = ec2.describe_instances(
        Filters=[
            {"Name": f"tag:{TAG_LAUNCH}", "Values": [launch_id]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
    )
    return [instance for r in found["Reservations"] for instance in r["Instances"]]


def lifecycle_of(instance: dict[str, Any]) -> str:
    return "spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand"


def tags_of(instance: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}


def requested(faults: WireFaults) -> list[tuple[str, int]]:
    """(lifecycle, total capacity) of every CreateFleet call made."""
    return [
        (
            call.params["TargetCapacitySpecification"]["DefaultTargetCapacityType"],
            call.params["TargetCapacitySpecification"]["TotalTargetCapacity"],
        )
        for call in faults.calls_to("CreateFleet")
    ]


# ---- plain launches --------------------------------------------------------------------------------------


def test_spot_launch_makes_the_requested_spot_instances_tagged_with_the_launch(
    ec2: Any, network: Network, launcher: FleetLauncher
) -> None:
    # given
    pool = make_pool(network)
    launch_id = new_launch_id()

    # when
    result = launcher.launch(pool, network.template, launch_id, 5)

    # then
    live = live_instances(ec2, launch_id)
    assert len(live) == 5
    assert {lifecycle_of(instance) for instance in live} == {"spot"}
    assert {instance["InstanceId"] for instance in live} == {i.instance_id for i in result.instances}
    for instance in live:
        assert tags_of(instance)[TAG_FLEET] == FLEET
        assert tags_of(instance)[TAG_POOL] == "docker"
        assert tags_of(instance)["Name"] == f"{FLEET}-docker"
        assert instance["SubnetId"] in network.subnets
    assert {i.lifecycle for i in result.instances} == {Lifecycle.SPOT}
    assert all(i.subnet_id in network.subnets for i in result.instances)
    assert (result.errors, result.fallback_used, result.calls) == ((), False, 1)


def test_on_demand_pool_launches_on_demand_without_a_spot_attempt(
    ec2: Any, network: Network, launcher: FleetLauncher, faults: WireFaults
) -> None:
    # given
    pool = make_pool(network, market="on-demand")
    launch_id = new_launch_id()

    # when
    result = launcher.launch(pool, network.template, launch_id, 2)

    # then
    assert [lifecycle_of(instance) for instance in live_instances(ec2, launch_id)] == ["on-demand"] * 2
    assert requested(faults) == [("on-demand", 2)]
    assert not result.fallback_used


# ---- capacity --------------------------------------------------------------------------------------------


def test_capacity_errors_for_some_types_launch_from_the_others_and_report_the_errors(
    ec2: Any, network: Network, launcher: FleetLauncher, faults: WireFaults
) -> None:
    # given: no spot m7i.large anywhere, and the other pools can supply only 3 of the 5
    pool = make_pool(network, on_demand_fallback=False)
    launch_id = new_launch_id()
    faults.capacity_shortage(["m7i.large"], unavailable=2)

    # when
    result = launcher.launch(pool, network.template, launch_id, 5)

    # then
    live = live_instances(ec2, launch_id)
    assert len(live) == 3
    assert {lifecycle_of(instance) for instance in live} == {"spot"}
    assert "m7i.large" not in {instance["InstanceType"] for instance in live}
    assert len(result.instances) == 3
    assert {(e.code, e.instance_type, e.subnet_id, e.lifecycle) for e in result.capacity_errors} == {
        ("InsufficientInstanceCapacity", "m7i.large", subnet, Lifecycle.SPOT) for subnet in network.subnets
    }
    assert result.other_errors == ()
    assert (result.fallback_used, result.calls) == (False, 1)


def test_partial_spot_capacity_is_topped_up_on_demand_to_exactly_the_count(
    ec2: Any, network: Network, launcher: FleetLauncher, faults: WireFaults
) -> None:
    # given
    pool = make_pool(network)
    launch_id = new_launch_id()
    faults.capacity_shortage(["m7i.large"], unavailable=2)

    # when
    result = launcher.launch(pool, network.template, launch_id, 5)

    # then
    assert sorted(lifecycle_of(instance) for instance in live_instances(ec2, launch_id)) == [
        "on-demand",
        "on-demand",
        "spot",
        "spot",
        "spot",
    ]
    assert requested(faults) == [("spot", 5), ("on-demand", 2)]
    assert (len(result.instances), result.fallback_used, result.calls) == (5, True, 2)


def test_no_spot_capacity_falls_back_to_on_demand_for_the_missing_count(
    ec2: Any, network: Network, launcher: FleetLauncher, faults: WireFaults
) -> None:
    # given
    pool = make_pool(network)
    launch_id = new_launch_id()
    faults.capacity_shortage()

    # when
    result = launcher.launch(pool, network.template, launch_id, 5)

    # then
    live = live_instances(ec2, launch_id)
    assert [lifecycle_of(instance) for instance in live] == ["on-demand"] * 5
    assert {i.lifecycle for i in result.instances} == {Lifecycle.ON_DEMAND}
    assert len(result.capacity_errors) == len(TYPES) * len(network.subnets)
    assert requested(faults) == [("spot", 5), ("on-demand", 5)]
    assert (result.fallback_used, result.calls) == (True, 2)


def test_no_spot_capacity_and_no_fallback_launches_nothing_and_reports_why(
    ec2: Any, network: Network, launcher: FleetLauncher, faults: WireFaults
) -> None:
    # given
    pool = make_pool(network, on_demand_fallback=False)
    launch_id = new_launch_id()
    faults.capacity_shortage()

    # when
    result = launcher.launch(pool, network.template, launch_id, 5)

    # then
    assert live_instances(ec2, launch_id) == []
    assert result.instances == ()
    assert {e.instance_type for e in result.capacity_errors} == set(TYPES)
    assert {e.code for e in result.errors} == {"InsufficientInstanceCapacity"}
    assert requested(faults) == [("spot", 5)]
    assert (result.fallback_used, result.calls) == (False, 1)


def test_capacity_error_raised_as_an_exception_is_retryable(
    ec2: Any, network: Network, launcher: FleetLauncher, faults: WireFaults
) -> None:
    # given
    launch_id = new_launch_id()
    faults.fail("CreateFleet", "InsufficientInstanceCapacity", "Insufficient capacity.")

    # when
    with pytest.raises(RetryableError) as raised:
        launcher.launch(make_pool(network), network.template, launch_id, 2)

    # then
    assert "InsufficientInstanceCapacity" in raised.value.reason
    assert live_instances(ec2, launch_id) == []


# ---- throttling and other API errors ---------------------------------------------------------------------


def test_throttled_twice_then_answered_makes_exactly_one_set_of_instances(
    ec2: Any, network: Network, launcher: FleetLauncher, faults: WireFaults
) -> None:
    # given
    launch_id = new_launch_id()
    faults.fail("CreateFleet", "RequestLimitExceeded", times=2)

    # when
    result = launcher.launch(make_pool(network), network.template, launch_id, 5)

    # then: botocore retried on the wire; our code made one call, and moto holds one set of instances
    assert len(live_instances(ec2, launch_id)) == 5
    assert len(result.instances) == 5
    assert faults.attempts("CreateFleet") == 3
    assert len(faults.calls_to("CreateFleet")) == 1


def test_throttled_on_every_attempt_is_retryable_and_launches_nothing(
    ec2: Any, network: Network, launcher: FleetLauncher, faults: WireFaults
) -> None:
    # given
    launch_id = new_launch_id()
    faults.fail("CreateFleet", "RequestLimitExceeded")

    # when
    with pytest.raises(RetryableError) as raised:
        launcher.launch(make_pool(network), network.template, launch_id, 5)

    # then
    assert "RequestLimitExceeded" in raised.value.reason
    assert live_instances(ec2, launch_id) == []
    # botocore's standard mode retried on the wire and gave up after its last attempt
    assert faults.attempts("CreateFleet") == ec2.meta.config.retries["total_max_attempts"] > 1


@pytest.mark.parametrize(
    "code",
    ["InvalidLaunchTemplateName.NotFoundException", "UnauthorizedOperation", "Unsupported", "InvalidParameterValue"],
)
def test_a_rejected_request_is_refused_not_retried(
    ec2: Any, network: Network, launcher: FleetLauncher, faults: WireFaults, code: str
) -> None:
    # given: EC2 refuses the call as a whole ("Unsupported" too: only inside Errors is it a capacity answer)
    launch_id = new_launch_id()
    faults.fail("CreateFleet", code, "The request is refused.")

    # when
    with pytest.raises(LaunchRefusedError) as raised:
        launcher.launch(make_pool(network), network.template, launch_id, 1)

    # then
    assert raised.value.code == code
    assert code in raised.value.reason
    assert faults.attempts("CreateFleet") == 1
    assert live_instances(ec2, launch_id) == []


def test_a_throttled_fallback_keeps_the_spot_instances_already_made(
    ec2: Any, network: Network, launcher: FleetLauncher, faults: WireFaults
) -> None:
    # given: spot supplies 3 of 5, then every attempt of the on-demand call is throttled
    launch_id = new_launch_id()
    faults.capacity_shortage(["m7i.large"], unavailable=2)
    faults.fail("CreateFleet", "RequestLimitExceeded", after=1)

    # when
    result = launcher.launch(make_pool(network), network.template, launch_id, 5)

    # then
    assert [lifecycle_of(instance) for instance in live_instances(ec2, launch_id)] == ["spot"] * 3
    assert {i.instance_id for i in result.instances} == {i["InstanceId"] for i in live_instances(ec2, launch_id)}
    assert (result.fallback_used, result.calls) == (True, 2)
    assert [(e.code, e.lifecycle) for e in result.other_errors] == [("RequestLimitExceeded", Lifecycle.ON_DEMAND)]


# ---- a caller that dies mid-launch -----------------------------------------------------------------------


def test_instances_made_before_a_crash_are_found_by_launch_id(
    ec2: Any, network: Network, launcher: FleetLauncher, faults: WireFaults
) -> None:
    # given: the Lambda dies after CreateFleet reached EC2 and before it could record the instances
    launch_id = new_launch_id()
    faults.crash_after("CreateFleet")
    with pytest.raises(SimulatedCrash):
        launcher.launch(make_pool(network), network.template, launch_id, 4)

    # when
    adopted = launcher.find_launched(launch_id)

    # then
    assert {i.instance_id for i in adopted} == {i["InstanceId"] for i in live_instances(ec2, launch_id)}
    assert len(adopted) == 4
    assert {i.lifecycle for i in adopted} == {Lifecycle.SPOT}
    assert all(i.subnet_id in network.subnets for i in adopted)


def test_find_launched_ignores_terminated_instances_and_reads_the_lifecycle(
    ec2: Any, network: Network, launcher: FleetLauncher, faults: WireFaults
) -> None:
    # given: 2 spot and 1 on-demand instance from one launch, then one spot instance terminated
    launch_id = new_launch_id()
    faults.capacity_shortage(["m7i.large"], unavailable=1)
    made = launcher.launch(make_pool(network), network.template, launch_id, 3)
    gone = next(i for i in made.instances if i.lifecycle is Lifecycle.SPOT)
    ec2.terminate_instances(InstanceIds=[gone.instance_id])

    # when
    adopted = launcher.find_launched(launch_id)

    # then
    assert gone.instance_id not in {i.instance_id for i in adopted}
    assert sorted(i.lifecycle.value for i in adopted) == ["on-demand", "spot"]
