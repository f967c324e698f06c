"""Every generated IAM policy linted with parliament: unknown actions, condition keys an action does not take,
resource types that do not match. A finding is either fixed in the generator or allowed below, with why."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest
from parliament import analyze_policy_string

from chalicelib.config import load_config
from fleetctl.iam_policies import runner_instance_policy
from fleetctl.lambda_policies import iter_policy_files

PROJECT_DIR = Path(__file__).resolve().parents[2]
STAGES = ("dev", "prod")


def _findings(policy: dict[str, Any]) -> list[Any]:
    return list(analyze_policy_string(json.dumps(policy, indent=2)).findings)


def _covered_elsewhere(policy: dict[str, Any], detail: list[dict[str, str]]) -> bool:
    """Whether each (action, resource format) parliament misses in one statement is granted by another.

    RunInstances and CreateFleet authorize several resource types in one call (instance, subnet, image...).
    Scoping each type differently takes one statement per type, and parliament judges every statement alone:
    it reports the action's other required types as a mismatch (a known false positive for multi-resource
    actions). The finding is harmless exactly when another statement of the same policy grants that action on
    that resource type, which this checks.
    """
    for missing in detail:
        action, wanted = missing["action"], missing["required_format"].replace("arn:*:", "arn:aws:", 1)
        if not any(
            action in statement["Action"]
            and any(fnmatch.fnmatchcase(resource, wanted) for resource in statement["Resource"])
            for statement in policy["Statement"]
        ):
            return False
    return True


@pytest.mark.parametrize("policy_file", list(iter_policy_files(list(STAGES))), ids=lambda f: f.path.name)
def test_lambda_policy_has_no_parliament_finding(policy_file: Any) -> None:
    # given the policy as generated
    policy = json.loads(policy_file.text)

    # when linted
    findings = _findings(policy)

    # then nothing is left but multi-resource mismatches that other statements cover
    unexplained = [
        (finding.issue, finding.detail)
        for finding in findings
        if not (finding.issue == "RESOURCE_MISMATCH" and _covered_elsewhere(policy, finding.detail))
    ]
    assert unexplained == []


@pytest.mark.parametrize("stage", STAGES)
def test_runner_instance_policy_has_no_parliament_finding(stage: str) -> None:
    # given
    config = load_config(PROJECT_DIR / "chalicelib" / "stages" / f"{stage}.yaml")

    # when
    findings = [finding for pool in config.pools for finding in _findings(runner_instance_policy(config, pool))]

    # then nothing: the token statement's dynamodb:LeadingKeys is a condition key GetItem and DeleteItem take
    assert [(finding.issue, finding.detail) for finding in findings] == []
