"""The AWS shim's EC2 launch rules (``fleetctl/sandbox/aws_rules/ec2_fleet.py``), through real botocore.

Each test names where the behaviour it encodes is documented or observed. The product's side of each rule is
tested where the product is: ``test_fleet_rules_in_scale_up.py`` and ``test_bootstrap.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from botocore.exceptions import ClientError

from chalicelib.aws import AwsClients
from fleetctl.sandbox.local_aws import LocalAws

pytestmark = pytest.mark.timeout(120)

TEMPLATE = "ec2-rules-test"


@dataclass(frozen=True)
class Account:
    clients: AwsClients
    zone_a: tuple[str, str]  # two subnets in us-east-1a
    zone_b: str
    image: str

    @property
    def ec2(self) -> Any:
        return self.clients.ec2

    def spot_role(self) -> None:
        self.clients.client("iam").create_service_linked_role(AWSServiceName="spot.amazonaws.com")

    def fleet(self, subnets: list[str], *, lifecycle: str = "spot", types: tuple[str, ...] = ("m5.large",)) -> Any:
        return self.ec2.create_fleet(
            Type="instant",
            LaunchTemplateConfigs=[
                {
                    "LaunchTemplateSpecification": {"LaunchTemplateName": TEMPLATE, "Version": "$Default"},
                    "Overrides": [{"InstanceType": t, "SubnetId": s} for t in types for s in subnets],
                }
            ],
            TargetCapacitySpecification={"TotalTargetCapacity": 1, "DefaultTargetCapacityType": lifecycle},
        )

    def running(self) -> int:
        found = self.ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["running"]}])
        return sum(len(r["Instances"]) for r in found["Reservations"])


@pytest.fixture
def account(local_aws: LocalAws) -> Account:
    local_aws.reset()
    clients = AwsClients()
    ec2 = clients.ec2
    vpc = ec2.create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]

    def subnet(n: int, zone: str) -> str:
        return str(
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.30.{n}.0/24", AvailabilityZone=zone)["Subnet"]["SubnetId"]
        )

    image = ec2.describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": ["al2023-ami-2023*"]}])[
        "Images"
    ][0]["ImageId"]
    ec2.create_launch_template(LaunchTemplateName=TEMPLATE, LaunchTemplateData={"ImageId": image})
    return Account(clients, (subnet(1, "us-east-1a"), subnet(2, "us-east-1a")), subnet(3, "us-east-1b"), image)


# -- InvalidFleetConfig ---------------------------------------------------------------------------------------


def test_a_fleet_naming_one_instance_type_twice_in_one_zone_is_refused_whole(account: Account) -> None:
    """CreateFleet with two overrides of the same instance type in one Availability Zone (here: two subnets of
    us-east-1a) fails as a whole, HTTP 400 ``InvalidFleetConfig`` "The fleet configuration contains duplicate
    instance pools.", and launches nothing. An instance pool is an instance type in one zone.

    Sources: the error as AWS answers it, https://github.com/aws-samples/aws-plugin-for-slurm/issues/19 (two
    subnets in one zone) and https://github.com/github-aws-runners/terraform-aws-github-runner/issues/5297;
    a capacity pool is "a set of unused instances with the same instance type and Availability Zone",
    https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instant-fleet.html;
    CreateFleet, https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_CreateFleet.html
    """
    account.spot_role()
    for lifecycle in ("spot", "on-demand"):
        # when
        with pytest.raises(ClientError) as refused:
            account.fleet([*account.zone_a, account.zone_b], lifecycle=lifecycle, types=("m5.large", "m6i.large"))
        # then
        error = refused.value.response
        assert error["Error"] == {
            "Code": "InvalidFleetConfig",
            "Message": "The fleet configuration contains duplicate instance pools.",
        }
        assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert account.running() == 0

    # and the same types over one subnet per zone is a valid fleet
    made = account.fleet([account.zone_a[0], account.zone_b], types=("m5.large", "m6i.large"))
    assert sum(len(i["InstanceIds"]) for i in made["Instances"]) == 1


def test_a_zone_named_directly_counts_like_a_subnet_in_it(account: Account) -> None:
    """An override naming ``AvailabilityZone`` is the same pool as one naming a subnet of that zone (sources as
    above)."""
    account.spot_role()
    with pytest.raises(ClientError) as refused:
        account.ec2.create_fleet(
            Type="instant",
            LaunchTemplateConfigs=[
                {
                    "LaunchTemplateSpecification": {"LaunchTemplateName": TEMPLATE, "Version": "$Default"},
                    "Overrides": [
                        {"InstanceType": "m5.large", "SubnetId": account.zone_a[0]},
                        {"InstanceType": "m5.large", "AvailabilityZone": "us-east-1a"},
                    ],
                }
            ],
            TargetCapacitySpecification={"TotalTargetCapacity": 1, "DefaultTargetCapacityType": "on-demand"},
        )
    assert refused.value.response["Error"]["Code"] == "InvalidFleetConfig"


# -- the spot service-linked role ----------------------------------------------------------------------------


def test_spot_without_the_service_linked_role_launches_nothing(account: Account) -> None:
    """Without ``AWSServiceRoleForEC2Spot`` and without ``iam:CreateServiceLinkedRole`` no spot instance launches:
    RunInstances with spot market options fails with ``AuthFailure.ServiceLinkedRoleCreationNotPermitted`` "The
    provided credentials do not have permission to create the service-linked role for EC2 Spot Instances."
    (HTTP 403), and an instant CreateFleet answers 200 with no instance and that error for every override, with
    lifecycle spot. On-demand launches are not affected; once the role exists, spot launches.

    Sources: https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/service-linked-roles-spot-instance-requests.html;
    CreateFleet's errors as Karpenter meets them, aws/karpenter-provider-aws
    pkg/providers/instance/suite_test.go ("should return an ICE error when spot instances are used and SpotSLR
    can't be created"); the RunInstances error and its 403, https://github.com/determined-ai/determined/issues/1830
    and https://github.com/aws-samples/aws-eda-slurm-cluster/issues/23
    """
    # given an account that never launched spot
    subnets = [account.zone_a[0], account.zone_b]

    # when a spot fleet is asked for
    answer = account.fleet(subnets, types=("m5.large", "m6i.large"))

    # then no instance, and the refusal for each of the four overrides
    assert answer.get("Instances", []) == []
    assert answer["FleetId"].startswith("fleet-")
    errors = answer["Errors"]
    assert {(e["ErrorCode"], e["ErrorMessage"], e["Lifecycle"]) for e in errors} == {
        (
            "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
            "The provided credentials do not have permission to create the service-linked role for EC2 Spot Instances.",
            "spot",
        )
    }
    assert sorted(
        (
            e["LaunchTemplateAndOverrides"]["Overrides"]["InstanceType"],
            e["LaunchTemplateAndOverrides"]["Overrides"]["SubnetId"],
        )
        for e in errors
    ) == sorted((t, s) for t in ("m5.large", "m6i.large") for s in subnets)
    assert {e["LaunchTemplateAndOverrides"]["LaunchTemplateSpecification"]["LaunchTemplateName"] for e in errors} == {
        TEMPLATE
    }

    # and RunInstances with spot market options is refused as a call
    with pytest.raises(ClientError) as refused:
        account.ec2.run_instances(
            ImageId=account.image,
            MinCount=1,
            MaxCount=1,
            InstanceType="m5.large",
            SubnetId=account.zone_b,
            InstanceMarketOptions={"MarketType": "spot"},
        )
    assert refused.value.response["Error"]["Code"] == "AuthFailure.ServiceLinkedRoleCreationNotPermitted"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert account.running() == 0

    # and on-demand still launches
    made = account.fleet(subnets, lifecycle="on-demand")
    assert sum(len(i["InstanceIds"]) for i in made["Instances"]) == 1

    # when the role exists
    account.spot_role()
    # then spot launches too
    made = account.fleet(subnets)
    assert [i["Lifecycle"] for i in made["Instances"]] == ["spot"]
    account.ec2.run_instances(
        ImageId=account.image, MinCount=1, MaxCount=1, InstanceMarketOptions={"MarketType": "spot"}
    )
    assert account.running() == 3
