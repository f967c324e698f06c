"""Runner AMIs per architecture, without AWS: a pool's architecture from its instance types' facts, and the
runner AMIs a Packer manifest records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetctl.ami import ManifestError, ami_parameter_name, built_amis, parse_manifest, pool_architecture

FIXTURE = Path(__file__).parents[1] / "fixtures" / "packer-manifest.json"
# ProcessorInfo.SupportedArchitectures as DescribeInstanceTypes answers them
# (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_ProcessorInfo.html).
FACTS = {
    "m7i.large": ("x86_64",),
    "m6i.large": ("x86_64",),
    "m7g.large": ("arm64",),
    "c7g.xlarge": ("arm64",),
    "t2.large": ("i386", "x86_64"),
    "mac2.metal": ("arm64_mac",),
}


# ---- a pool's architecture ----------------------------------------------------------------------------------


def test_types_of_one_architecture_give_it() -> None:
    assert pool_architecture(["m7i.large", "m6i.large"], FACTS).architecture == "x86_64"
    assert pool_architecture(["m7g.large", "c7g.xlarge"], FACTS).architecture == "arm64"


def test_a_type_running_several_architectures_counts_as_any() -> None:
    # t2 runs i386 and x86_64: next to an x86_64-only type, the pool is x86_64
    decided = pool_architecture(["t2.large", "m6i.large"], FACTS)
    assert (decided.architecture, decided.candidates, decided.problem) == ("x86_64", ("x86_64",), "")


def test_mixed_architectures_name_each_type() -> None:
    decided = pool_architecture(["m7i.large", "m7g.large", "t2.large"], FACTS)
    assert decided.architecture is None
    assert decided.problem.startswith(
        "no architecture common to all (m7i.large, t2.large: x86_64; m7g.large: arm64); a launch template boots one AMI"
    )


def test_a_type_of_no_runner_architecture_is_named() -> None:
    decided = pool_architecture(["mac2.metal"], FACTS)
    assert decided.architecture is None
    assert "mac2.metal: arm64_mac" in decided.problem


def test_an_unknown_type_is_named() -> None:
    decided = pool_architecture(["m7i.large", "m7i.larg"], FACTS)
    assert (decided.architecture, decided.problem) == (None, "unknown instance type(s) in the region: m7i.larg")


def test_the_parameter_of_an_architecture() -> None:
    assert ami_parameter_name("/runner-fleet/dev/runner-ami", "arm64") == "/runner-fleet/dev/runner-ami/arm64"
    assert ami_parameter_name("/runner-fleet/dev/runner-ami/", "x86_64") == "/runner-fleet/dev/runner-ami/x86_64"


# ---- Packer's manifest -------------------------------------------------------------------------------------------


def test_the_latest_build_of_each_architecture_in_the_region() -> None:
    """The manifest post-processor appends each run's builds (``build_time``, ``artifact_id`` "region:ami-id",
    comma-separated when copied to other regions; ``custom_data`` as the template sets it):
    https://developer.hashicorp.com/packer/docs/post-processors/manifest."""
    # given the fixture: two x86_64 runs, the later one newer, and an arm64 build copied to eu-west-1
    manifest = parse_manifest(FIXTURE.read_text())

    # when
    amis = built_amis(manifest, "us-east-1")

    # then
    assert [(ami.architecture, ami.image_id, ami.build) for ami in amis] == [
        ("x86_64", "ami-0bbbbbbbbbbbbbbb1", "builds[1](runner)"),
        ("arm64", "ami-0ddddddddddddddd3", "builds[2](runner)"),
    ]


def test_a_region_some_build_did_not_reach_is_refused() -> None:
    manifest = parse_manifest(FIXTURE.read_text())
    with pytest.raises(ManifestError) as refused:
        built_amis(manifest, "eu-west-1", "manifest.json")
    assert refused.value.problems == [
        "builds[0](runner): no AMI in eu-west-1 (artifact_id 'us-east-1:ami-0aaaaaaaaaaaaaaa0')",
        "builds[1](runner): no AMI in eu-west-1 (artifact_id 'us-east-1:ami-0bbbbbbbbbbbbbbb1')",
    ]


def test_a_build_without_its_architecture_is_refused() -> None:
    document = json.loads(FIXTURE.read_text())
    del document["builds"][2]["custom_data"]
    document["builds"][0]["custom_data"]["arch"] = "amd64"
    with pytest.raises(ManifestError) as refused:
        built_amis(parse_manifest(json.dumps(document)), "us-east-1")
    assert refused.value.problems == [
        "builds[0](runner): custom_data.arch is 'amd64', must be one of x86_64, arm64",
        "builds[2](runner): custom_data.arch is missing, must be one of x86_64, arm64",
    ]


def test_what_is_not_a_manifest_is_refused() -> None:
    with pytest.raises(ManifestError, match="not a Packer manifest"):
        parse_manifest('{"builds": "none"}')
    with pytest.raises(ManifestError, match="not a Packer manifest"):
        parse_manifest("packer-manifest")
    with pytest.raises(ManifestError, match="no builds"):
        built_amis(parse_manifest('{"builds": []}'), "us-east-1")
