"""A network and runner AMIs for the sandbox, made in moto, so the stage config can name real ids.

The shipped stage files name placeholder subnets and security groups. Launch templates and CreateFleet work on
ids that exist, so the sandbox (and the tests) create a VPC, one subnet per availability zone and an
egress-only security group, register a stand-in runner AMI of each architecture under the config's
``ami_parameter`` (``<ami_parameter>/x86_64`` and ``<ami_parameter>/arm64``), and rewrite the config to use
them. moto's ids fit the config's id rules (17 hex digits).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

SANDBOX_CIDR = "10.42.0.0/16"
SUBNET_PREFIX = 20
SECURITY_GROUP_NAME = "runner-fleet-sandbox-runners"
SANDBOX_AMI_NAME = "runner-fleet-sandbox-runner"
# Not Amazon Linux's /dev/xvda: Ubuntu's images (and many built on them) boot from /dev/sda1, and the sandbox
# image does too, so that a launch template assuming /dev/xvda would show in every test.
SANDBOX_ROOT_DEVICE = "/dev/sda1"
SANDBOX_ROOT_GIB = 8


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


def register_sandbox_amis(ssm_client: Any, ec2_client: Any, ami_parameter: str) -> dict[str, str]:
    """Registers the account's own stand-in runner AMI of each architecture (once) and publishes its id where
    ``fleetctl ami publish`` would: ``<ami_parameter>/<arch>``. Returns the image id of each architecture.

    EBS-backed images whose root device is ``/dev/sda1`` (see ``SANDBOX_ROOT_DEVICE``), made as an image is
    registered in AWS: from a snapshot of a root volume.
    """
    from fleetctl.ami import AMI_DATA_TYPE, ARCHITECTURES, ami_parameter_name

    published = {}
    for architecture in ARCHITECTURES:
        name = f"{SANDBOX_AMI_NAME}-{architecture}"
        found = ec2_client.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])
        image_id = (
            str(found["Images"][0]["ImageId"]) if found["Images"] else _register_image(ec2_client, name, architecture)
        )
        ssm_client.put_parameter(
            Name=ami_parameter_name(ami_parameter, architecture),
            Value=image_id,
            Type="String",
            DataType=AMI_DATA_TYPE,
            Overwrite=True,
            Description=f"runner-fleet sandbox: stand-in {architecture} runner AMI",
        )
        published[architecture] = image_id
    return published


def _register_image(ec2_client: Any, name: str, architecture: str) -> str:
    zone = ec2_client.describe_availability_zones()["AvailabilityZones"][0]["ZoneName"]
    volume = ec2_client.create_volume(AvailabilityZone=zone, Size=SANDBOX_ROOT_GIB, VolumeType="gp3")["VolumeId"]
    snapshot = ec2_client.create_snapshot(VolumeId=volume, Description=f"{name} root")["SnapshotId"]
    ec2_client.delete_volume(VolumeId=volume)
    return str(
        ec2_client.register_image(
            Name=name,
            Description=f"runner-fleet sandbox: stand-in {architecture} runner AMI",
            Architecture=architecture,
            VirtualizationType="hvm",
            EnaSupport=True,
            RootDeviceName=SANDBOX_ROOT_DEVICE,
            BlockDeviceMappings=[
                {
                    "DeviceName": SANDBOX_ROOT_DEVICE,
                    "Ebs": {"SnapshotId": snapshot, "VolumeSize": SANDBOX_ROOT_GIB, "VolumeType": "gp3"},
                }
            ],
        )["ImageId"]
    )
