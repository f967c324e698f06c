"""A network and a runner AMI for the sandbox, made in moto, so the stage config can name real ids.

The shipped stage files name placeholder subnets and security groups. Launch templates and CreateFleet work on
ids that exist, so the sandbox (and the tests) create a VPC, one subnet per availability zone and an
egress-only security group, register one of the AMIs moto already knows under the config's ``ami_parameter``,
and rewrite the config to use them. moto's ids fit the config's id rules (17 hex digits).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

SANDBOX_CIDR = "10.42.0.0/16"
SUBNET_PREFIX = 20
SECURITY_GROUP_NAME = "runner-fleet-sandbox-runners"
SANDBOX_AMI_FILTERS = (
    {"Name": "name", "Values": ["al2023-ami-2023*"]},
    {"Name": "architecture", "Values": ["x86_64"]},
)


@dataclass(frozen=True)
class SandboxNetwork:
    vpc_id: str
    subnet_ids: tuple[str, ...]
    security_group_id: str


def create_sandbox_network(ec2_client: Any, *, subnets: int = 2) -> SandboxNetwork:
    """A new VPC with ``subnets`` subnets in distinct zones and a security group allowing egress only."""
    zones = sorted(
        zone["ZoneName"]
        for zone in ec2_client.describe_availability_zones(Filters=[{"Name": "state", "Values": ["available"]}])[
            "AvailabilityZones"
        ]
    )
    if not 1 <= subnets <= len(zones):
        raise ValueError(f"subnets must be between 1 and {len(zones)} (one per zone), got {subnets}")
    vpc_id = ec2_client.create_vpc(
        CidrBlock=SANDBOX_CIDR,
        TagSpecifications=[{"ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": "runner-fleet-sandbox"}]}],
    )["Vpc"]["VpcId"]
    blocks = ipaddress.ip_network(SANDBOX_CIDR).subnets(new_prefix=SUBNET_PREFIX)
    subnet_ids = tuple(
        ec2_client.create_subnet(VpcId=vpc_id, CidrBlock=str(block), AvailabilityZone=zone)["Subnet"]["SubnetId"]
        for zone, block in zip(zones[:subnets], blocks, strict=False)
    )
    group_id = ec2_client.create_security_group(
        GroupName=SECURITY_GROUP_NAME, Description="runner-fleet sandbox runners: egress only", VpcId=vpc_id
    )["GroupId"]
    # A new VPC group starts with no ingress and allow-all egress; revoke whatever ingress there is anyway, so
    # the group is egress-only whatever the backend's defaults.
    found = ec2_client.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    if found.get("IpPermissions"):
        ec2_client.revoke_security_group_ingress(GroupId=group_id, IpPermissions=found["IpPermissions"])
    return SandboxNetwork(vpc_id=vpc_id, subnet_ids=subnet_ids, security_group_id=group_id)


def register_sandbox_ami(ssm_client: Any, ec2_client: Any, parameter_name: str) -> str:
    """Stores the id of an AMI moto knows (Amazon's, first by name) in ``parameter_name``; returns the id.

    Amazon Linux 2023 for x86_64 is preferred: runner_ami/ builds on it, and its root device is the one the
    launch templates size. The filter also matters for speed: moto lists over a thousand Amazon images
    otherwise, which takes more than a second per call.
    """
    images = ec2_client.describe_images(Owners=["amazon"], Filters=list(SANDBOX_AMI_FILTERS))["Images"]
    if not images:
        images = ec2_client.describe_images(Owners=["amazon"])["Images"]
    if not images:
        raise LookupError("the local EC2 knows no Amazon AMI to stand in for the runner AMI")
    image = min(images, key=lambda found: (found.get("Name") or "", found["ImageId"]))
    image_id = str(image["ImageId"])
    ssm_client.put_parameter(
        Name=parameter_name,
        Value=image_id,
        Type="String",
        Overwrite=True,
        Description="runner-fleet sandbox: stand-in runner AMI",
    )
    return image_id
