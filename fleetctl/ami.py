"""Runner AMIs per CPU architecture: which architecture a pool's instance types run, where the runner AMI of each
architecture is published, and ``fleetctl ami publish``, which puts Packer's freshly built AMIs there.

A launch template boots one AMI and an AMI is built for one architecture, so every instance type of a pool must
run that architecture: CreateFleet would otherwise start some of the pool's instances on an image their CPU
cannot execute. The runner AMI of each architecture lives in the SSM parameter ``<ami_parameter>/<arch>``
(``x86_64`` or ``arm64``, the names EC2 uses for an image's ``Architecture`` and an instance type's
``ProcessorInfo.SupportedArchitectures``).

Packer's manifest post-processor records each build as ``artifact_id`` ``"<region>:<ami id>"`` (several
``region:id`` pairs, comma-separated, when the AMI was copied to other regions); the runner template adds
``custom_data.arch``. Publishing checks each AMI with EC2 (it exists, with that architecture) before it writes
any parameter, so a bad manifest changes nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, ValidationError

from chalicelib.aws import AwsClients, error_code
from chalicelib.config import FleetConfig
from chalicelib.errors import RunnerFleetError

# The architectures runner AMIs are built for, in order of preference for a pool whose types run several.
ARCHITECTURES = ("x86_64", "arm64")
AMI_ID = re.compile(r"ami-(?:[0-9a-f]{8}|[0-9a-f]{17})")
# SSM validates an aws:ec2:image value as an AMI id the account can use (asynchronously, see PutParameter).
AMI_DATA_TYPE = "aws:ec2:image"


def ami_parameter_name(base: str, architecture: str) -> str:
    """The SSM parameter holding the runner AMI id of ``architecture``: ``<ami_parameter>/<architecture>``."""
    return f"{base.rstrip('/')}/{architecture}"


# ---- a pool's architecture (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolArchitecture:
    """The architecture a pool's AMI must have, or why its instance types admit none."""

    architecture: str | None
    # Every runner architecture all the pool's types can run (an AMI of any of them would boot on each).
    candidates: tuple[str, ...] = ()
    problem: str = ""


def pool_architecture(instance_types: Sequence[str], supported: Mapping[str, Sequence[str]]) -> PoolArchitecture:
    """The one architecture every type in ``instance_types`` runs, from ``supported`` (an instance type's
    ``ProcessorInfo.SupportedArchitectures``, as DescribeInstanceTypes answers it; a type missing from it is
    unknown in the region). A type running several architectures (``i386`` and ``x86_64``) counts as any of them;
    when several runner architectures remain, the first of :data:`ARCHITECTURES` wins."""
    unknown = [name for name in instance_types if name not in supported]
    if unknown:
        return PoolArchitecture(None, problem=f"unknown instance type(s) in the region: {', '.join(unknown)}")
    common = [arch for arch in ARCHITECTURES if all(arch in supported[name] for name in instance_types)]
    if common:
        return PoolArchitecture(common[0], tuple(common))
    by_architectures: dict[str, list[str]] = {}
    for name in instance_types:
        runs = [arch for arch in supported[name] if arch in ARCHITECTURES] or list(supported[name])
        by_architectures.setdefault(" or ".join(runs) or "no architecture", []).append(name)
    found = "; ".join(f"{', '.join(names)}: {arch}" for arch, names in by_architectures.items())
    return PoolArchitecture(
        None,
        problem=f"no architecture common to all ({found}); a launch template boots one AMI, built for one of "
        f"{', '.join(ARCHITECTURES)}: keep a pool's instance types to one architecture",
    )


def instance_type_architectures(ec2: Any, instance_types: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``ProcessorInfo.SupportedArchitectures`` of each of ``instance_types`` the region knows, in one
    (paginated) DescribeInstanceTypes. A filter rather than ``InstanceTypes``: one unknown type would fail the
    whole call (``InvalidInstanceType``) instead of being left out."""
    wanted = sorted(set(instance_types))
    if not wanted:
        return {}
    found: dict[str, tuple[str, ...]] = {}
    pages = ec2.get_paginator("describe_instance_types").paginate(Filters=[{"Name": "instance-type", "Values": wanted}])
    for page in pages:
        for info in page["InstanceTypes"]:
            found[str(info["InstanceType"])] = tuple(info.get("ProcessorInfo", {}).get("SupportedArchitectures", ()))
    return found


@dataclass(frozen=True)
class ImageFacts:
    image_id: str
    architecture: str
    root_device: str
    name: str
    state: str


def describe_image(ec2: Any, image_id: str) -> ImageFacts | None:
    """What EC2 says about one AMI; None when the region has no such image."""
    try:
        images = ec2.describe_images(ImageIds=[image_id])["Images"]
    except ClientError as exc:
        if error_code(exc) not in ("InvalidAMIID.NotFound", "InvalidAMIID.Unavailable", "InvalidAMIID.Malformed"):
            raise
        images = []
    if not images:
        return None
    image = images[0]
    return ImageFacts(
        image_id=image_id,
        architecture=str(image.get("Architecture", "")),
        root_device=str(image.get("RootDeviceName", "")),
        name=str(image.get("Name", "")),
        state=str(image.get("State", "")),
    )


# ---- Packer's manifest (pure) ---------------------------------------------------------------------------------


class ManifestError(RunnerFleetError):
    """A Packer manifest that names no usable runner AMI; ``problems`` says why, one line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class PackerBuild(BaseModel):
    """One entry of ``builds`` in the manifest post-processor's output."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    builder_type: str = ""
    build_time: int = 0
    artifact_id: str
    packer_run_uuid: str = ""
    custom_data: dict[str, str] | None = None


class PackerManifest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    builds: list[PackerBuild]
    last_run_uuid: str = ""


@dataclass(frozen=True)
class BuiltAmi:
    build: str
    architecture: str
    image_id: str


def parse_manifest(text: str, source: str = "manifest") -> PackerManifest:
    try:
        return PackerManifest.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        raise ManifestError(source, [f"not a Packer manifest: {exc}".splitlines()[0]]) from None


def built_amis(manifest: PackerManifest, region: str, source: str = "manifest") -> list[BuiltAmi]:
    """The latest runner AMI of each architecture the manifest records in ``region``.

    Without ``packer build -force`` the post-processor appends each run's builds to the file (one run per
    architecture, say), so of several builds for one architecture the latest ``build_time`` wins, and of equal
    times (``strip_time``) the later entry."""
    builds = list(enumerate(manifest.builds))
    problems: list[str] = []
    latest: dict[str, tuple[int, BuiltAmi]] = {}
    for index, build in builds:
        where = f"builds[{index}]({build.name})"
        arch = (build.custom_data or {}).get("arch")
        if arch not in ARCHITECTURES:
            got = "missing" if arch is None else repr(arch)
            problems.append(f"{where}: custom_data.arch is {got}, must be one of {', '.join(ARCHITECTURES)}")
            continue
        in_region = [
            image.strip()
            for pair in build.artifact_id.split(",")
            for at, _, image in [pair.strip().partition(":")]
            if at == region
        ]
        if not in_region:
            problems.append(f"{where}: no AMI in {region} (artifact_id {build.artifact_id!r})")
            continue
        if not AMI_ID.fullmatch(in_region[0]):
            problems.append(f"{where}: {in_region[0]!r} in artifact_id is not an AMI id")
            continue
        found = BuiltAmi(where, arch, in_region[0])
        if arch not in latest or build.build_time >= latest[arch][0]:
            latest[arch] = (build.build_time, found)
    if problems:
        raise ManifestError(source, problems)
    if not latest:
        raise ManifestError(source, ["no builds"])
    return [latest[arch][1] for arch in ARCHITECTURES if arch in latest]


# ---- publishing (I/O) -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publication:
    parameter: str
    ami: BuiltAmi
    image_name: str
    previous: str | None
    # The parameter's new version; None when it already held this AMI and was left alone.
    version: int | None

    def describe(self) -> str:
        what = f"{self.ami.image_id} ({self.ami.architecture}, {self.image_name or 'unnamed'})"
        if self.version is None:
            return f"unchanged {self.parameter}: already {what}"
        was = f", was {self.previous}" if self.previous else ""
        return f"published {what} to {self.parameter} (version {self.version}{was})"


def publish_amis(
    config: FleetConfig, clients: AwsClients, amis: Sequence[BuiltAmi], source: str = "manifest"
) -> list[Publication]:
    """Write each AMI id to ``<ami_parameter>/<arch>``, once EC2 confirms every one of them exists, is
    available and has its architecture; raises ``ManifestError`` naming each AMI that does not, writing
    nothing."""
    region = clients.ec2.meta.region_name
    facts: dict[str, ImageFacts] = {}
    problems: list[str] = []
    for ami in amis:
        found = describe_image(clients.ec2, ami.image_id)
        if found is None:
            problems.append(f"{ami.build}: {ami.image_id} not found in {region}")
        elif found.architecture != ami.architecture:
            problems.append(
                f"{ami.build}: {ami.image_id} is {found.architecture or 'of no architecture'}, "
                f"the manifest says {ami.architecture}"
            )
        elif found.state != "available":
            problems.append(f"{ami.build}: {ami.image_id} is {found.state}, not available")
        else:
            facts[ami.image_id] = found
    if problems:
        raise ManifestError(source, problems)
    published = []
    for ami in amis:
        name = ami_parameter_name(config.ami_parameter, ami.architecture)
        previous = _parameter_value(clients.ssm, name)
        version: int | None = None
        if previous != ami.image_id:
            version = int(
                clients.ssm.put_parameter(
                    Name=name,
                    Value=ami.image_id,
                    Type="String",
                    DataType=AMI_DATA_TYPE,
                    Overwrite=True,
                    Description=f"runner-fleet {config.fleet}: {ami.architecture} runner AMI",
                )["Version"]
            )
        published.append(Publication(name, ami, facts[ami.image_id].name, previous, version))
    return published


def _parameter_value(ssm: Any, name: str) -> str | None:
    try:
        return str(ssm.get_parameter(Name=name)["Parameter"]["Value"])
    except ClientError as exc:
        if error_code(exc) != "ParameterNotFound":
            raise
        return None
