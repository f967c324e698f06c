"""The CreateFleet request a pool produces, and how CreateFleet answers are read. No network."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from chalicelib.config import PoolConfig, parse_config
from chalicelib.scaling.fleet import (
    CAPACITY_ERROR_CODES,
    TAG_FLEET,
    TAG_LAUNCH,
    TAG_POOL,
    FleetError,
    LaunchedInstance,
    LaunchTemplateRef,
    Lifecycle,
    build_fleet_request,
    classify_fleet_result,
    client_token,
    shared_zones,
)

SUBNET_A = "subnet-0a1b2c3d4e5f60718"
SUBNET_B = "subnet-0b1c2d3e4f5a60718"
TEMPLATE = LaunchTemplateRef("runner-fleet-test-docker")
LAUNCH = "launch-7f0c2a51-3b7e-4c9a-9d61-0d2f6f1b8e42"


def make_pool(**overrides: Any) -> PoolConfig:
    pool: dict[str, Any] = {
        "name": "docker",
        "tags": ["docker"],
        "instance_types": ["m7i.large", "m6i.large", "m5.large"],
        "subnets": [SUBNET_A, SUBNET_B],
        "security_groups": ["sg-0a1b2c3d4e5f60718"],
        "max_runners": 20,
        "image": {"repository": "ci/build-base"},
        **overrides,
    }
    config = parse_config(
        {
            "fleet": "runner-fleet-test",
            "gitlab": {"url": "https://gitlab.example.com", "token_parameter": "/runner-fleet/test/gitlab-token"},
            "webhook": {"token_parameter": "/runner-fleet/test/webhook-token"},
            "state": {"table": "fleet", "jobs_queue": "jobs", "dead_letter_queue": "jobs-dlq"},
            "cache_bucket": "runner-fleet-test-cache",
            "ami_parameter": "/runner-fleet/test/runner-ami",
            "pools": [pool],
        }
    )
    return config.pools[0]


def request(lifecycle: Lifecycle = Lifecycle.SPOT, count: int = 5, **pool: Any) -> dict[str, Any]:
    return build_fleet_request(
        make_pool(**pool), TEMPLATE, fleet="runner-fleet-test", launch_id=LAUNCH, count=count, lifecycle=lifecycle
    )


# CreateFleet (instant) answers in the shape the EC2 API reference documents: partial success carries
# instances and errors together; total failure has no instances. Both are HTTP 200.
def _template_and(instance_type: str, subnet: str, zone: str) -> dict[str, Any]:
    return {
        "LaunchTemplateSpecification": {
            "LaunchTemplateId": "lt-0e8c754449b27161c",
            "LaunchTemplateName": "runner-fleet-test-docker",
            "Version": "1",
        },
        "Overrides": {"InstanceType": instance_type, "SubnetId": subnet, "AvailabilityZone": zone},
    }


PARTIAL_SUCCESS: dict[str, Any] = {
    "FleetId": "fleet-12a34b55-67cd-8ef9-ba9b-9208dEXAMPLE",
    "Errors": [
        {
            "LaunchTemplateAndOverrides": _template_and("m7i.large", SUBNET_A, "us-east-1a"),
            "Lifecycle": "spot",
            "ErrorCode": "InsufficientInstanceCapacity",
            "ErrorMessage": "There is no Spot capacity available that matches your request.",
        },
        {
            "LaunchTemplateAndOverrides": _template_and("m7i.large", SUBNET_B, "us-east-1b"),
            "Lifecycle": "spot",
            "ErrorCode": "InvalidFleetConfiguration",
            "ErrorMessage": "Your requested instance type is not supported in the requested subnet.",
        },
    ],
    "Instances": [
        {
            "LaunchTemplateAndOverrides": _template_and("m6i.large", SUBNET_B, "us-east-1b"),
            "Lifecycle": "spot",
            "InstanceIds": ["i-0123456789abcdef0", "i-0123456789abcdef1"],
            "InstanceType": "m6i.large",
            "Platform": None,
        },
        {
            "LaunchTemplateAndOverrides": _template_and("m5.large", SUBNET_A, "us-east-1a"),
            "Lifecycle": "spot",
            "InstanceIds": ["i-0123456789abcdef2"],
            "InstanceType": "m5.large",
        },
    ],
}

TOTAL_FAILURE: dict[str, Any] = {
    "FleetId": "fleet-22a34b55-67cd-8ef9-ba9b-9208dEXAMPLE",
    "Errors": [
        {
            "LaunchTemplateAndOverrides": _template_and(instance_type, subnet, zone),
            "Lifecycle": "spot",
            "ErrorCode": "InsufficientInstanceCapacity",
            "ErrorMessage": "There is no Spot capacity available that matches your request.",
        }
        for instance_type in ("m7i.large", "m6i.large")
        for subnet, zone in ((SUBNET_A, "us-east-1a"), (SUBNET_B, "us-east-1b"))
    ]
    + [
        {
            "LaunchTemplateAndOverrides": _template_and("m5.large", SUBNET_A, "us-east-1a"),
            "Lifecycle": "spot",
            "ErrorCode": "UnfulfillableCapacity",
            "ErrorMessage": "Unable to fulfill capacity due to your request configuration.",
        }
    ],
    "Instances": [],
}


# ---- the request -----------------------------------------------------------------------------------------


def test_overrides_are_every_instance_type_in_every_subnet_in_config_order() -> None:
    # when
    configs = request()["LaunchTemplateConfigs"]

    # then
    assert configs == [
        {
            "LaunchTemplateSpecification": {"LaunchTemplateName": "runner-fleet-test-docker", "Version": "$Default"},
            "Overrides": [
                {"InstanceType": "m7i.large", "SubnetId": SUBNET_A},
                {"InstanceType": "m7i.large", "SubnetId": SUBNET_B},
                {"InstanceType": "m6i.large", "SubnetId": SUBNET_A},
                {"InstanceType": "m6i.large", "SubnetId": SUBNET_B},
                {"InstanceType": "m5.large", "SubnetId": SUBNET_A},
                {"InstanceType": "m5.large", "SubnetId": SUBNET_B},
            ],
        }
    ]


def test_subnets_sharing_a_zone_are_found_by_zone_in_config_order() -> None:
    # given three subnets, two of them in us-east-1a (CreateFleet would name each type twice there)
    subnet_c = "subnet-0c1d2e3f4a5b60718"
    zones = {SUBNET_A: "us-east-1a", SUBNET_B: "us-east-1b", subnet_c: "us-east-1a"}
    # then
    assert shared_zones([subnet_c, SUBNET_B, SUBNET_A], zones) == {"us-east-1a": (subnet_c, SUBNET_A)}
    assert shared_zones([SUBNET_A, SUBNET_B], zones) == {}
    # a subnet whose zone is unknown is left out (bootstrap reports it missing instead)
    assert shared_zones([SUBNET_A, "subnet-0d1e2f3a4b5c60718"], zones) == {}


def test_the_same_launch_builds_the_same_request() -> None:
    assert request() == request()


def test_an_explicit_template_version_is_used_as_given() -> None:
    # when
    built = build_fleet_request(
        make_pool(),
        LaunchTemplateRef("runner-fleet-test-docker", "7"),
        fleet="runner-fleet-test",
        launch_id=LAUNCH,
        count=1,
        lifecycle=Lifecycle.SPOT,
    )

    # then
    assert built["LaunchTemplateConfigs"][0]["LaunchTemplateSpecification"]["Version"] == "7"


def test_a_spot_request_is_an_instant_fleet_of_spot_capacity_price_capacity_optimized() -> None:
    # when
    built = request(Lifecycle.SPOT, count=5)

    # then
    assert built["Type"] == "instant"
    assert built["TargetCapacitySpecification"] == {
        "TotalTargetCapacity": 5,
        "DefaultTargetCapacityType": "spot",
        "SpotTargetCapacity": 5,
    }
    assert built["SpotOptions"] == {"AllocationStrategy": "price-capacity-optimized"}
    assert "OnDemandOptions" not in built


def test_an_on_demand_request_asks_for_on_demand_capacity_at_the_lowest_price() -> None:
    # when
    built = request(Lifecycle.ON_DEMAND, count=2)

    # then
    assert built["Type"] == "instant"
    assert built["TargetCapacitySpecification"] == {
        "TotalTargetCapacity": 2,
        "DefaultTargetCapacityType": "on-demand",
        "OnDemandTargetCapacity": 2,
    }
    assert built["OnDemandOptions"] == {"AllocationStrategy": "lowest-price"}
    assert "SpotOptions" not in built


@pytest.mark.parametrize("count", [0, -1])
def test_a_request_for_no_instance_is_refused(count: int) -> None:
    with pytest.raises(ValueError, match="count"):
        request(count=count)


def test_instances_volumes_and_the_fleet_are_tagged_at_creation() -> None:
    # when
    specs = request()["TagSpecifications"]

    # then
    assert [spec["ResourceType"] for spec in specs] == ["instance", "volume", "fleet"]
    for spec in specs:
        assert {tag["Key"]: tag["Value"] for tag in spec["Tags"]} == {
            "Name": "runner-fleet-test-docker",
            TAG_FLEET: "runner-fleet-test",
            TAG_POOL: "docker",
            TAG_LAUNCH: LAUNCH,
        }


def test_the_client_token_is_the_launch_and_lifecycle_token() -> None:
    assert request(Lifecycle.SPOT)["ClientToken"] == client_token(LAUNCH, Lifecycle.SPOT)
    assert request(Lifecycle.ON_DEMAND)["ClientToken"] == client_token(LAUNCH, Lifecycle.ON_DEMAND)


# ---- the client token ------------------------------------------------------------------------------------


def test_client_token_is_deterministic() -> None:
    assert client_token(LAUNCH, Lifecycle.SPOT) == client_token(LAUNCH, Lifecycle.SPOT)


@pytest.mark.parametrize("launch_id", ["x", LAUNCH, "é" * 300, "launch/" + "9" * 500])
@pytest.mark.parametrize("lifecycle", list(Lifecycle))
def test_client_token_is_at_most_64_ascii_characters(launch_id: str, lifecycle: Lifecycle) -> None:
    token = client_token(launch_id, lifecycle)
    assert 0 < len(token) <= 64
    assert token.isascii()
    assert token.isprintable()


def test_the_fallback_of_a_launch_has_its_own_token() -> None:
    assert client_token(LAUNCH, Lifecycle.SPOT) != client_token(LAUNCH, Lifecycle.ON_DEMAND)


def test_different_launches_have_different_tokens() -> None:
    assert client_token("launch-1", Lifecycle.SPOT) != client_token("launch-2", Lifecycle.SPOT)


# ---- reading the answer ----------------------------------------------------------------------------------


def test_partial_success_gives_every_instance_and_every_error() -> None:
    # when
    outcome = classify_fleet_result(PARTIAL_SUCCESS)

    # then
    assert outcome.instances == (
        LaunchedInstance("i-0123456789abcdef0", "m6i.large", SUBNET_B, Lifecycle.SPOT),
        LaunchedInstance("i-0123456789abcdef1", "m6i.large", SUBNET_B, Lifecycle.SPOT),
        LaunchedInstance("i-0123456789abcdef2", "m5.large", SUBNET_A, Lifecycle.SPOT),
    )
    assert outcome.capacity_errors == (
        FleetError(
            code="InsufficientInstanceCapacity",
            message="There is no Spot capacity available that matches your request.",
            instance_type="m7i.large",
            subnet_id=SUBNET_A,
            lifecycle=Lifecycle.SPOT,
        ),
    )
    assert [(e.code, e.instance_type, e.subnet_id) for e in outcome.other_errors] == [
        ("InvalidFleetConfiguration", "m7i.large", SUBNET_B)
    ]


def test_total_failure_is_no_instance_and_only_capacity_errors() -> None:
    # when
    outcome = classify_fleet_result(TOTAL_FAILURE)

    # then
    assert outcome.instances == ()
    assert len(outcome.errors) == 5
    assert outcome.capacity_errors == outcome.errors
    assert outcome.other_errors == ()
    assert {e.code for e in outcome.errors} == {"InsufficientInstanceCapacity", "UnfulfillableCapacity"}


def test_an_answer_without_instances_or_errors_is_empty() -> None:
    outcome = classify_fleet_result({"FleetId": "fleet-1"})
    assert (outcome.instances, outcome.errors) == ((), ())


def test_on_demand_instances_are_read_as_on_demand() -> None:
    # given
    answer = copy.deepcopy(PARTIAL_SUCCESS)
    for entry in answer["Instances"]:
        entry["Lifecycle"] = "on-demand"

    # when
    outcome = classify_fleet_result(answer)

    # then
    assert {i.lifecycle for i in outcome.instances} == {Lifecycle.ON_DEMAND}


def test_the_subnet_is_read_from_the_entry_when_the_overrides_omit_it() -> None:
    # given: newer API versions carry SubnetId on the instance entry; older ones only in the overrides
    answer = {
        "Instances": [
            {
                "LaunchTemplateAndOverrides": {"Overrides": {"InstanceType": "m5.large"}},
                "SubnetId": SUBNET_B,
                "Lifecycle": "spot",
                "InstanceIds": ["i-0123456789abcdef3"],
                "InstanceType": "m5.large",
            },
            {"Lifecycle": "spot", "InstanceIds": ["i-0123456789abcdef4"], "InstanceType": "m5.large"},
        ]
    }

    # when
    outcome = classify_fleet_result(answer)

    # then
    assert [i.subnet_id for i in outcome.instances] == [SUBNET_B, None]


@pytest.mark.parametrize("code", sorted(CAPACITY_ERROR_CODES))
def test_capacity_codes_are_capacity_errors(code: str) -> None:
    assert FleetError(code, "", "m5.large", SUBNET_A, Lifecycle.SPOT).capacity


@pytest.mark.parametrize(
    "code", ["InvalidLaunchTemplateName.NotFoundException", "UnauthorizedOperation", "InvalidParameterValue", ""]
)
def test_other_codes_are_not_capacity_errors(code: str) -> None:
    assert not FleetError(code, "", None, None, None).capacity
