"""``fleetctl ami publish`` against moto server: Packer's manifest in, ``<ami_parameter>/<arch>`` out, and
nothing written when EC2 disagrees with the manifest. Also the AWS shim's rule that keeps a registered image's
architecture, which publishing and bootstrap read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from chalicelib.aws import AwsClients
from fleetctl.cli import main
from fleetctl.sandbox.local_aws import SANDBOX_REGION, LocalAws

FIXTURE = Path(__file__).parents[1] / "fixtures" / "packer-manifest.json"
DEV_PARAMETER = "/runner-fleet/dev/runner-ami"
# The ids the fixture's latest builds name in us-east-1.
FIXTURE_X86 = "ami-0bbbbbbbbbbbbbbb1"
FIXTURE_ARM = "ami-0ddddddddddddddd3"


@pytest.fixture
def clients(local_aws: LocalAws) -> AwsClients:
    local_aws.reset()
    return AwsClients(region=SANDBOX_REGION)


def register(clients: AwsClients, name: str, architecture: str | None) -> str:
    """An AMI as Packer's amazon-ebs builder leaves it: registered from a snapshot of the built root volume."""
    ec2 = clients.ec2
    zone = ec2.describe_availability_zones()["AvailabilityZones"][0]["ZoneName"]
    volume = ec2.create_volume(AvailabilityZone=zone, Size=8, VolumeType="gp3")["VolumeId"]
    snapshot = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
    arguments: dict[str, Any] = {"Architecture": architecture} if architecture else {}
    return str(
        ec2.register_image(
            Name=name,
            RootDeviceName="/dev/xvda",
            VirtualizationType="hvm",
            BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot}}],
            **arguments,
        )["ImageId"]
    )


def manifest_naming(tmp_path: Path, x86: str, arm: str) -> Path:
    """The fixture manifest with its latest builds naming images that exist in the local EC2."""
    path = tmp_path / "manifest.json"
    path.write_text(FIXTURE.read_text().replace(FIXTURE_X86, x86).replace(FIXTURE_ARM, arm))
    return path


def publish(manifest: Path, *arguments: str) -> Result:
    return CliRunner().invoke(main, ["ami", "publish", str(manifest), *(arguments or ("--stage", "dev"))])


def parameter(clients: AwsClients, name: str) -> dict[str, Any] | None:
    found = clients.ssm.get_parameters(Names=[name])["Parameters"]
    return dict(found[0]) if found else None


def test_publish_writes_each_architecture_once(clients: AwsClients, tmp_path: Path) -> None:
    # given the AMIs a Packer run built, one per architecture
    x86 = register(clients, "runner-fleet-runner-x86_64", "x86_64")
    arm = register(clients, "runner-fleet-runner-arm64", "arm64")
    manifest = manifest_naming(tmp_path, x86, arm)

    # when
    result = publish(manifest)

    # then each id is in the dev stage's parameter of its architecture, typed as an AMI id
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"published {x86} (x86_64, runner-fleet-runner-x86_64) to {DEV_PARAMETER}/x86_64 (version 1)",
        f"published {arm} (arm64, runner-fleet-runner-arm64) to {DEV_PARAMETER}/arm64 (version 1)",
    ]
    for name, image in ((f"{DEV_PARAMETER}/x86_64", x86), (f"{DEV_PARAMETER}/arm64", arm)):
        stored = parameter(clients, name)
        assert stored is not None
        assert (stored["Value"], stored["Type"], stored["DataType"]) == (image, "String", "aws:ec2:image")

    # and publishing the same manifest again changes nothing
    again = publish(manifest)
    assert again.exit_code == 0
    assert again.output.splitlines() == [
        f"unchanged {DEV_PARAMETER}/x86_64: already {x86} (x86_64, runner-fleet-runner-x86_64)",
        f"unchanged {DEV_PARAMETER}/arm64: already {arm} (arm64, runner-fleet-runner-arm64)",
    ]

    # and a newer build replaces the old id, saying which it was
    newer = register(clients, "runner-fleet-runner-x86_64-2", "x86_64")
    result = publish(manifest_naming(tmp_path, newer, arm), "--config", "chalicelib/stages/dev.yaml")
    assert result.output.splitlines()[0] == (
        f"published {newer} (x86_64, runner-fleet-runner-x86_64-2) to {DEV_PARAMETER}/x86_64 (version 2, was {x86})"
    )


def test_an_ami_of_another_architecture_publishes_nothing(clients: AwsClients, tmp_path: Path) -> None:
    # given the arm64 build's id naming an x86_64 image, and the x86_64 build's an image EC2 does not have
    x86 = register(clients, "runner-fleet-runner-x86_64", "x86_64")
    manifest = manifest_naming(tmp_path, "ami-0123456789abcdef0", x86)

    # when
    result = publish(manifest)

    # then both are named, and no parameter is written
    assert result.exit_code == 1
    assert f"builds[1](runner): ami-0123456789abcdef0 not found in {SANDBOX_REGION}" in result.output
    assert f"builds[2](runner): {x86} is x86_64, the manifest says arm64" in result.output
    assert "nothing was published" in result.output
    assert clients.ssm.describe_parameters()["Parameters"] == []


def test_a_manifest_without_architectures_publishes_nothing(clients: AwsClients, tmp_path: Path) -> None:
    # given a manifest from a template whose manifest post-processor sets no custom_data
    document = json.loads(FIXTURE.read_text())
    for build in document["builds"]:
        del build["custom_data"]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(document))

    # when
    result = publish(path)

    # then
    assert result.exit_code == 1
    assert "builds[0](runner): custom_data.arch is missing, must be one of x86_64, arm64" in result.output
    assert clients.ssm.describe_parameters()["Parameters"] == []


def test_registered_images_keep_their_architecture(clients: AwsClients) -> None:
    """RegisterImage's ``Architecture`` is the image's (DescribeImages ``Architecture``), and without one an
    EBS-backed image is i386: https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_RegisterImage.html
    (moto drops it; the shim rule ``ec2-image-architecture`` keeps it)."""
    # given
    arm = register(clients, "registered-arm64", "arm64")
    plain = register(clients, "registered-default", None)

    # when
    found = {image["ImageId"]: image for image in clients.ec2.describe_images(ImageIds=[arm, plain])["Images"]}

    # then
    assert found[arm]["Architecture"] == "arm64"
    assert found[plain]["Architecture"] == "i386"
    # the rest of the answer is moto's, block device mappings included
    assert found[arm]["BlockDeviceMappings"]
    # and Amazon's own images keep the architecture moto knows
    amazon = clients.ec2.describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": ["al2023-ami-2023*"]}])[
        "Images"
    ]
    assert {image["Architecture"] for image in amazon} == {"x86_64", "arm64"}
