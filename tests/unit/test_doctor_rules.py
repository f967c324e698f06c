"""The pure judgements behind ``fleetctl doctor``: another account's repository policy, a hook's state, a deployed
function's environment, a launch template version's settings and a role policy's statements."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chalicelib.config import parse_config
from fleetctl.doctor import (
    environment_problems,
    hook_problems,
    policy_allows_pull,
    policy_difference,
    pull_statement_policy,
    template_problems,
)
from fleetctl.iam_policies import runner_instance_policy

ROLE = "arn:aws:iam::111122223333:role/runner-fleet/prod/prod-docker-runner"
ACCOUNT = "111122223333"
URL = "https://abc.execute-api.eu-west-1.amazonaws.com/api/webhooks/gitlab"


def statement(effect: str = "Allow", principal: Any = None, actions: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "Effect": effect,
        "Principal": {"AWS": ROLE} if principal is None else principal,
        "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"] if actions is None else actions,
        **extra,
    }


@pytest.mark.parametrize(
    ("statements", "allowed"),
    [
        ([statement()], True),
        ([statement(principal={"AWS": f"arn:aws:iam::{ACCOUNT}:root"})], True),
        ([statement(principal={"AWS": [ACCOUNT, "arn:aws:iam::999999999999:root"]})], True),
        ([statement(principal="*")], True),
        ([statement(actions="ecr:*")], True),
        ([statement(actions="ecr:BatchGetImage")], False),  # no layers, no pull
        ([statement(principal={"AWS": "arn:aws:iam::999999999999:root"})], False),
        ([statement(), statement(effect="Deny", actions="ecr:GetDownloadUrlForLayer")], False),
        ([statement(Condition={"StringEquals": {"aws:PrincipalOrgID": "o-123"}})], False),
        ([], False),
    ],
)
def test_whether_a_repository_policy_lets_the_pools_role_pull(statements: list[Any], allowed: bool) -> None:
    assert policy_allows_pull({"Version": "2012-10-17", "Statement": statements}, ROLE, ACCOUNT) is allowed


def test_the_proposed_statement_is_one_the_check_accepts() -> None:
    assert policy_allows_pull(pull_statement_policy(ROLE), ROLE, ACCOUNT)


def hook(**changes: Any) -> dict[str, Any]:
    return {"url": URL, "job_events": True, "alert_status": "executable", **changes}


@pytest.mark.parametrize(
    ("answer", "deliveries", "url", "expected"),
    [
        (hook(), [], URL, []),
        (hook(), [{"response_status": "200"}], URL, []),
        (hook(job_events=False), [], URL, ["job events are off"]),
        (
            hook(url="https://old.example/"),
            [],
            URL,
            [f"its URL is https://old.example/, not the deployed webhook's {URL}"],
        ),
        (hook(), [], None, ["the deployed webhook URL is unknown: pass --webhook-url to compare"]),
        (hook(token_present=False), [], URL, ["it has no secret token: the webhook refuses every delivery (401)"]),
        (
            hook(),
            [{"response_status": 401}, {"response_status": "200"}],
            URL,
            ["1 of its last 20 deliveries were refused with 401: its secret token is not the stage's webhook token"],
        ),
        (
            hook(alert_status="temporarily_disabled", disabled_until="2026-12-06T15:00:00.000Z"),
            [],
            URL,
            ["GitLab does not execute it: temporarily_disabled until 2026-12-06T15:00:00.000Z"],
        ),
    ],
)
def test_what_keeps_a_hook_from_feeding_the_fleet(
    answer: dict[str, Any], deliveries: list[Any], url: str | None, expected: list[str]
) -> None:
    assert hook_problems(answer, deliveries, url) == expected


def test_a_deployed_environment_is_compared_variable_by_variable(tmp_path: Path) -> None:
    # given a project whose stage file the functions name relative to the package root
    chalice_config = tmp_path / ".chalice" / "config.json"
    chalice_config.parent.mkdir()
    chalice_config.write_text("{}")
    stage_file = tmp_path / "chalicelib" / "stages" / "prod.yaml"
    expected = {"RUNNER_FLEET_CONFIG": "chalicelib/stages/prod.yaml", "RUNNER_FLEET_TABLE": "fleet-prod", "A": "1"}

    # then
    assert environment_problems(dict(expected), expected, stage_file, chalice_config) == []
    deployed = {**expected, "RUNNER_FLEET_TABLE": "fleet-dev", "EXTRA": "x"}
    del deployed["A"]
    assert environment_problems(deployed, expected, stage_file, chalice_config) == [
        "A is not set (.chalice/config.json says '1')",
        "EXTRA is set ('x') but not in .chalice/config.json",
        "RUNNER_FLEET_TABLE is 'fleet-dev', not 'fleet-prod'",
    ]
    elsewhere = {**expected, "RUNNER_FLEET_CONFIG": "chalicelib/stages/dev.yaml"}
    assert environment_problems(elsewhere, expected, stage_file, chalice_config) == [
        f"RUNNER_FLEET_CONFIG names chalicelib/stages/dev.yaml, not {stage_file}"
    ]


CONFIG = {
    "fleet": "prod",
    "region": "eu-west-1",
    "gitlab": {"url": "https://gitlab.example.com", "token_parameter": "/p/gitlab"},
    "webhook": {"token_parameter": "/p/webhook"},
    "state": {"table": "prod", "jobs_queue": "prod-jobs", "dead_letter_queue": "prod-dlq"},
    "cache_bucket": "prod-cache",
    "ami_parameter": "/p/ami",
    "pools": [
        {
            "name": "docker",
            "tags": ["docker"],
            "instance_types": ["m7i.large"],
            "subnets": ["subnet-0a1b2c3d4e5f60718"],
            "security_groups": ["sg-0a1b2c3d4e5f60718"],
            "max_runners": 2,
            "image": {"repository": "ci/base"},
        }
    ],
}


def test_a_template_version_without_imdsv2_encryption_or_the_pools_profile_is_named() -> None:
    pool = parse_config(CONFIG).pools[0]
    good = {
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
        "BlockDeviceMappings": [{"DeviceName": "/dev/xvda", "Ebs": {"Encrypted": True}}],
        "IamInstanceProfile": {"Name": "prod-docker-runner"},
    }
    assert template_problems(good, pool, "prod") == []
    bad = {
        "MetadataOptions": {"HttpTokens": "optional", "HttpPutResponseHopLimit": 2},
        "BlockDeviceMappings": [{"DeviceName": "/dev/xvda", "Ebs": {"Encrypted": False}}],
        "IamInstanceProfile": {"Arn": "arn:aws:iam::1:instance-profile/admin"},
    }
    assert template_problems(bad, pool, "prod") == [
        "MetadataOptions.HttpTokens is 'optional', not 'required' (IMDSv2)",
        "MetadataOptions.HttpPutResponseHopLimit is 2, not 1 (job containers would reach the role's credentials)",
        "the volume /dev/xvda is not encrypted",
        "IamInstanceProfile is 'admin', not the pool's 'prod-docker-runner'",
    ]


def test_a_role_policy_granting_more_or_less_than_the_pool_needs_is_named() -> None:
    config = parse_config(CONFIG)
    wanted = runner_instance_policy(config, config.pools[0])
    assert policy_difference(wanted, wanted) == ([], [])
    broader = {
        **wanted,
        "Statement": [
            *wanted["Statement"][1:],
            {"Sid": "Everything", "Effect": "Allow", "Action": "s3:*", "Resource": "*"},
        ],
    }
    extra, lacking = policy_difference(broader, wanted)
    assert extra == ["Everything: Allow s3:* on *"]
    assert lacking == [
        "OwnRunnerTokenOnly: Allow dynamodb:DeleteItem, dynamodb:GetItem on arn:aws:dynamodb:*:*:table/prod"
    ]
