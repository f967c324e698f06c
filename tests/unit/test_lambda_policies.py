"""The Lambda policies: committed files current, ``fleetctl policies`` and ``validate`` catching drift, and what
the generated statements allow and refuse (judged by the same evaluator the suite-wide IAM check uses)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from chalicelib.config import FleetConfig, load_config
from chalicelib.naming import FLEET_TAG, runner_role_arn
from fleetctl.cli import main
from fleetctl.lambda_policies import (
    LambdaFunction,
    function_grants,
    iter_policy_files,
    policy_document,
    scale_up_grants,
)
from tests.iam_recorder import Request, allowing_statements

PROJECT_DIR = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
ACCOUNT = "123456789012"


@pytest.fixture(scope="module")
def dev() -> FleetConfig:
    return load_config(PROJECT_DIR / "chalicelib" / "stages" / "dev.yaml")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's .chalice/ and stage files, to change without touching the real ones."""
    shutil.copytree(PROJECT_DIR / ".chalice", tmp_path / ".chalice")
    shutil.copytree(PROJECT_DIR / "chalicelib" / "stages", tmp_path / "chalicelib" / "stages")
    return tmp_path


def allowed(config: FleetConfig, function: LambdaFunction, action: str, resource: str, **context: Any) -> list[str]:
    policy = policy_document(function_grants(config, function, "runner-fleet", "dev"))
    request = Request(
        function.value,
        "",
        action,
        action,
        resource,
        tuple((key, tuple(values)) for key, values in context.items()),
    )
    return allowing_statements(policy, request)[0]


def ec2(rest: str) -> str:
    return f"arn:aws:ec2:{REGION}:{ACCOUNT}:{rest}"


# ---- committed files ---------------------------------------------------------------------------------------


def test_committed_policies_are_what_the_stage_files_generate() -> None:
    # when every stage's policies are generated again
    files = list(iter_policy_files(["dev", "prod"]))

    # then each committed file is byte for byte what the generator writes
    assert len(files) == 2 * (len(LambdaFunction) + 1)  # each function's, and each stage's default role
    stale = [policy.path.name for policy in files if not policy.is_current()]
    assert stale == [], "run 'fleetctl policies' and commit the result"


def test_policies_check_names_a_stale_file_and_writing_fixes_it(project: Path) -> None:
    # given a committed policy edited by hand
    chalice = project / ".chalice" / "config.json"
    edited = project / ".chalice" / "policy-dev-webhook.json"
    edited.write_text(edited.read_text().replace("sqs:SendMessage", "sqs:*"))
    runner = CliRunner()

    # when checked
    checked = runner.invoke(main, ["policies", "--check", "--chalice-config", str(chalice)])

    # then it fails naming exactly that file, and writing puts it back
    assert checked.exit_code == 1
    assert "stale: policy-dev-webhook.json" in checked.output
    assert "policy-prod" not in checked.output
    written = runner.invoke(main, ["policies", "--stage", "dev", "--chalice-config", str(chalice)])
    assert written.exit_code == 0, written.output
    assert "wrote policy-dev-webhook.json" in written.output
    assert runner.invoke(main, ["policies", "--check", "--chalice-config", str(chalice)]).exit_code == 0


def test_a_stage_file_change_makes_the_policies_stale(project: Path) -> None:
    # given a new subnet in the dev stage file
    stage_file = project / "chalicelib" / "stages" / "dev.yaml"
    stage_file.write_text(stage_file.read_text().replace("subnet-0b1c2d3e4f5a60718", "subnet-0c1c2d3e4f5a60718"))

    # when
    checked = CliRunner().invoke(
        main, ["policies", "--check", "--chalice-config", str(project / ".chalice" / "config.json")]
    )

    # then scale-up's policy, which names the subnets, is stale
    assert checked.exit_code == 1
    assert "stale: policy-dev-scale-up.json" in checked.output


# ---- fleetctl validate: .chalice/config.json against the stage file ----------------------------------------


def validate(project: Path, stage: str = "dev") -> Any:
    return CliRunner().invoke(
        main,
        [
            "validate",
            str(project / "chalicelib" / "stages" / f"{stage}.yaml"),
            "--chalice-config",
            str(project / ".chalice" / "config.json"),
        ],
    )


def test_validate_passes_when_chalice_config_matches_the_stage_file(project: Path) -> None:
    # when
    result = validate(project)

    # then
    assert result.exit_code == 0, result.output
    assert "valid (runner-fleet-dev" in result.output


def test_validate_reports_environment_drift_and_stale_policies(project: Path) -> None:
    # given the stage file renamed its table, and the Chalice stage still names the old one
    stage_file = project / "chalicelib" / "stages" / "dev.yaml"
    stage_file.write_text(stage_file.read_text().replace("table: runner-fleet-dev", "table: runner-fleet-dev2"))
    chalice = project / ".chalice" / "config.json"
    document = json.loads(chalice.read_text())
    document["stages"]["dev"]["environment_variables"]["RUNNER_FLEET_WEBHOOK_SIGNING_PARAMETER"] = "/x/signing"
    chalice.write_text(json.dumps(document))

    # when
    result = validate(project)

    # then every disagreement is a line, and the exit status says so
    assert result.exit_code == 1
    assert "stage dev: environment_variables.RUNNER_FLEET_TABLE: is 'runner-fleet-dev'" in result.output
    assert "RUNNER_FLEET_WEBHOOK_SIGNING_PARAMETER: is '/x/signing' but the stage file says None" in result.output
    assert "stage dev: policy-dev-webhook.json is stale" in result.output
    assert "stage dev: policy-dev-scale-up.json is stale" in result.output
    # the prod stage loads another file: not compared
    assert "stage prod" not in result.output


def test_validate_reports_a_missing_policy_file(project: Path) -> None:
    # given
    (project / ".chalice" / "policy-prod-instance-state.json").unlink()

    # when
    result = validate(project, "prod")

    # then
    assert result.exit_code == 1
    assert "stage prod: policy-prod-instance-state.json is missing" in result.output


# ---- what the statements allow -----------------------------------------------------------------------------


def test_webhook_writes_only_job_items_and_runner_records(dev: FleetConfig) -> None:
    table = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{dev.state.table}"
    webhook = LambdaFunction.WEBHOOK
    assert allowed(dev, webhook, "dynamodb:UpdateItem", table, **{"dynamodb:LeadingKeys": ["JOB#7:9"]})
    # a runner record moves between busy and idle with its jobs
    assert allowed(dev, webhook, "dynamodb:UpdateItem", table, **{"dynamodb:LeadingKeys": ["RUNNER#i-0123"]})
    # a pool counter, a launch, a token: refused
    for key in ("POOL#docker", "LAUNCH#x", "TOKEN#AROAEXAMPLEROLEID0001:i-0123"):
        assert not allowed(dev, webhook, "dynamodb:UpdateItem", table, **{"dynamodb:LeadingKeys": [key]})
    # and nothing but UpdateItem and GetItem
    for action in ("dynamodb:PutItem", "dynamodb:DeleteItem", "dynamodb:Scan"):
        assert not allowed(dev, webhook, action, table, **{"dynamodb:LeadingKeys": ["JOB#7:9"]})


def test_instance_state_and_webhook_cannot_launch_or_write_tokens(dev: FleetConfig) -> None:
    table = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{dev.state.table}"
    token = {"dynamodb:LeadingKeys": ["TOKEN#AROAEXAMPLEROLEID0001:i-0123"]}
    for function in (LambdaFunction.WEBHOOK, LambdaFunction.INSTANCE_STATE):
        assert not allowed(dev, function, "ec2:CreateFleet", ec2("fleet/*"))
        assert not allowed(dev, function, "dynamodb:PutItem", table, **token)
        assert not allowed(dev, function, "dynamodb:GetItem", table, **token)
    # instance-state deletes an unread token, and no other item
    assert allowed(dev, LambdaFunction.INSTANCE_STATE, "dynamodb:DeleteItem", table, **token)
    assert not allowed(
        dev, LambdaFunction.INSTANCE_STATE, "dynamodb:DeleteItem", table, **{"dynamodb:LeadingKeys": ["POOL#docker"]}
    )


def test_reconcile_terminates_only_the_fleets_instances_and_reads_no_token(dev: FleetConfig) -> None:
    reconcile = LambdaFunction.RECONCILE
    table = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{dev.state.table}"
    token = {"dynamodb:LeadingKeys": ["TOKEN#AROAEXAMPLEROLEID0001:i-0123"]}
    ours = {f"aws:ResourceTag/{FLEET_TAG}": [dev.fleet]}
    assert allowed(dev, reconcile, "ec2:TerminateInstances", ec2("instance/i-0123"), **ours)
    assert not allowed(
        dev, reconcile, "ec2:TerminateInstances", ec2("instance/i-0123"), **{f"aws:ResourceTag/{FLEET_TAG}": ["other"]}
    )
    assert not allowed(dev, reconcile, "ec2:TerminateInstances", ec2("instance/i-0123"))
    # the live records are read from their index only; the table is never scanned, a token never read
    assert allowed(dev, reconcile, "dynamodb:Query", f"{table}/index/fleet-records")
    assert not allowed(dev, reconcile, "dynamodb:Query", table)
    assert not allowed(dev, reconcile, "dynamodb:Scan", table)
    assert allowed(dev, reconcile, "dynamodb:DeleteItem", table, **token)
    for action in ("dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"):
        assert not allowed(dev, reconcile, action, table, **token)
    # and no other function may terminate an instance at all
    for function in (LambdaFunction.WEBHOOK, LambdaFunction.SCALE_UP, LambdaFunction.INSTANCE_STATE):
        assert not allowed(dev, function, "ec2:TerminateInstances", ec2("instance/i-0123"), **ours)


def test_instance_interruption_touches_only_runner_records(dev: FleetConfig) -> None:
    interruption = LambdaFunction.INSTANCE_INTERRUPTION
    table = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{dev.state.table}"
    runner = {"dynamodb:LeadingKeys": ["RUNNER#i-0123456789abcdef0"]}
    # it marks and reads a runner record
    assert allowed(dev, interruption, "dynamodb:UpdateItem", table, **runner)
    assert allowed(dev, interruption, "dynamodb:GetItem", table, **runner)
    # and writes nothing else: no record created or deleted, no pool counter, job, launch or token
    assert not allowed(dev, interruption, "dynamodb:PutItem", table, **runner)
    assert not allowed(dev, interruption, "dynamodb:DeleteItem", table, **runner)
    for key in ("POOL#docker", "JOB#7:9", "LAUNCH#x", "TOKEN#AROAEXAMPLEROLEID0001:i-0123"):
        for action in ("dynamodb:GetItem", "dynamodb:UpdateItem"):
            assert not allowed(dev, interruption, action, table, **{"dynamodb:LeadingKeys": [key]})
    # and launches, terminates or queues nothing
    assert not allowed(dev, interruption, "ec2:CreateFleet", ec2("fleet/*"))
    assert not allowed(dev, interruption, "ec2:TerminateInstances", ec2("instance/*"))
    assert not allowed(dev, interruption, "sqs:SendMessage", f"arn:aws:sqs:{REGION}:{ACCOUNT}:{dev.state.jobs_queue}")


def test_scale_up_writes_tokens_but_never_reads_one(dev: FleetConfig) -> None:
    up = LambdaFunction.SCALE_UP
    table = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{dev.state.table}"
    token = {"dynamodb:LeadingKeys": ["TOKEN#AROAEXAMPLEROLEID0001:i-0123"]}
    assert allowed(dev, up, "dynamodb:PutItem", table, **token)
    assert allowed(dev, up, "dynamodb:DeleteItem", table, **token)
    for action in ("dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"):
        assert not allowed(dev, up, action, table, **token)
    # its own items as before
    assert allowed(dev, up, "dynamodb:GetItem", table, **{"dynamodb:LeadingKeys": ["RUNNER#i-0123"]})
    # and the pools' runner role ids, from those roles only
    for pool in dev.pools:
        assert allowed(dev, up, "iam:GetRole", runner_role_arn(dev.fleet, pool.name, ACCOUNT))
    assert not allowed(dev, up, "iam:GetRole", f"arn:aws:iam::{ACCOUNT}:role/admin")
    assert not allowed(dev, up, "iam:GetRole", f"arn:aws:iam::{ACCOUNT}:role/{dev.fleet}-runner")


def launch_context(template: str = "lt-0123456789abcdef0") -> dict[str, list[str]]:
    return {"ec2:LaunchTemplate": [ec2(f"launch-template/{template}")]}


def test_scale_up_launches_only_from_the_fleets_tagged_templates(dev: FleetConfig) -> None:
    up = LambdaFunction.SCALE_UP
    template = ec2("launch-template/lt-0123456789abcdef0")
    ours = {f"aws:ResourceTag/{FLEET_TAG}": [dev.fleet]}
    theirs = {f"aws:ResourceTag/{FLEET_TAG}": ["someone-else"]}
    for action in ("ec2:CreateFleet", "ec2:RunInstances"):
        assert allowed(dev, up, action, template, **ours)
        assert not allowed(dev, up, action, template, **theirs)
        assert not allowed(dev, up, action, template, **{"aws:ResourceTag/other": ["x"]})


def test_scale_up_launches_only_tagged_instances_into_the_pools_subnets(dev: FleetConfig) -> None:
    up = LambdaFunction.SCALE_UP
    tag = {f"aws:RequestTag/{FLEET_TAG}": [dev.fleet], **launch_context()}
    assert allowed(dev, up, "ec2:RunInstances", ec2("instance/*"), **tag)
    assert not allowed(dev, up, "ec2:RunInstances", ec2("instance/*"), **{f"aws:RequestTag/{FLEET_TAG}": ["x"]})
    assert allowed(dev, up, "ec2:CreateFleet", ec2("fleet/*"), **{f"aws:RequestTag/{FLEET_TAG}": [dev.fleet]})
    assert not allowed(dev, up, "ec2:CreateFleet", ec2("fleet/*"), **{f"aws:RequestTag/{FLEET_TAG}": ["x"]})
    subnet = dev.pools[0].subnets[0]
    assert allowed(dev, up, "ec2:RunInstances", ec2(f"subnet/{subnet}"))
    assert not allowed(dev, up, "ec2:RunInstances", ec2("subnet/subnet-0fffffffffffffff0"))
    group = dev.pools[0].security_groups[0]
    assert allowed(dev, up, "ec2:RunInstances", ec2(f"security-group/{group}"))
    assert not allowed(dev, up, "ec2:RunInstances", ec2("security-group/sg-0fffffffffffffff0"))
    # an image the request names instead of the template's is refused
    image = f"arn:aws:ec2:{REGION}::image/ami-0123456789abcdef0"
    assert allowed(dev, up, "ec2:RunInstances", image, **{"ec2:IsLaunchTemplateResource": ["true"], **launch_context()})
    assert not allowed(
        dev, up, "ec2:RunInstances", image, **{"ec2:IsLaunchTemplateResource": ["false"], **launch_context()}
    )


def test_scale_up_tags_only_at_launch_and_passes_exactly_the_pool_roles(dev: FleetConfig) -> None:
    up = LambdaFunction.SCALE_UP
    assert allowed(dev, up, "ec2:CreateTags", ec2("instance/*"), **{"ec2:CreateAction": ["CreateFleet"]})
    assert not allowed(dev, up, "ec2:CreateTags", ec2("instance/i-0123"), **{"ec2:CreateAction": ["CreateTags"]})
    to_ec2 = {"iam:PassedToService": ["ec2.amazonaws.com"]}
    for pool in dev.pools:
        role = runner_role_arn(dev.fleet, pool.name, ACCOUNT)
        assert allowed(dev, up, "iam:PassRole", role, **to_ec2)
        assert not allowed(dev, up, "iam:PassRole", role, **{"iam:PassedToService": ["lambda.amazonaws.com"]})
    # no other role: an administrator's, another pool name's under the fleet's path, the role pools once shared
    others = (
        f"arn:aws:iam::{ACCOUNT}:role/admin",
        runner_role_arn(dev.fleet, "not-a-pool", ACCOUNT),
        f"arn:aws:iam::{ACCOUNT}:role/{dev.fleet}-runner",
    )
    for role in others:
        assert not allowed(dev, up, "iam:PassRole", role, **to_ec2), role
    [grant] = [g for g in scale_up_grants(dev) if g.sid == "PassOnlyThePoolRoles"]
    assert sorted(grant.resources) == sorted(runner_role_arn(dev.fleet, pool.name) for pool in dev.pools)


def test_a_condition_key_the_call_does_not_give_is_a_denial(dev: FleetConfig) -> None:
    # the evaluator never lets a condition pass for want of a value (ForAllValues would, in IAM, on no keys)
    table = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{dev.state.table}"
    assert not allowed(dev, LambdaFunction.WEBHOOK, "dynamodb:UpdateItem", table)


def test_arns_follow_the_stage_regions_partition(dev: FleetConfig) -> None:
    # given the dev fleet in a China region
    china = dev.model_copy(update={"region": "cn-north-1"})

    # when
    text = json.dumps(policy_document(function_grants(china, LambdaFunction.SCALE_UP, "runner-fleet", "dev")))

    # then every ARN, in resources and conditions alike, is in the aws-cn partition
    assert '"arn:aws:' not in text
    assert '"arn:aws-cn:ec2:*:*:launch-template/*"' in text


def test_validate_reports_a_function_environment_that_overrides_the_stage(project: Path) -> None:
    # given scale-up's own environment pointing at another queue
    chalice = project / ".chalice" / "config.json"
    document = json.loads(chalice.read_text())
    document["stages"]["dev"]["lambda_functions"]["scale_up"]["environment_variables"] = {
        "RUNNER_FLEET_JOBS_QUEUE": "elsewhere"
    }
    chalice.write_text(json.dumps(document))

    # when
    result = validate(project)

    # then
    assert result.exit_code == 1
    assert "lambda_functions.scale_up.environment_variables.RUNNER_FLEET_JOBS_QUEUE: is 'elsewhere'" in result.output
