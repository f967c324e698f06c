"""``fleetctl doctor`` against the sandbox: a healthy stage passes every check, and each thing broken the way an
operator might break it (a parameter deleted, the hook removed or pointed elsewhere, a launch template version
without IMDSv2, the AMI parameter naming an image of the wrong architecture or none, a token without a scope, a
function not deployed) fails the check that reads it, with its fix, and the command exits 1.

Each test breaks a freshly bootstrapped stage and resets the shared sandbox afterwards, so no other test meets
what it broke.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from chalicelib import runtime
from chalicelib.naming import launch_template_name
from fleetctl.cli import main
from fleetctl.sandbox.stack import GITLAB_OPERATOR_TOKEN, SANDBOX_STAGE

CI_DIGEST = "sha256:" + "c" * 64
# A manifest moto takes (it needs the media type); its content does not matter here.
CI_MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"})


@pytest.fixture
def stage(fresh_sandbox: Any) -> Iterator[Any]:
    """A deployed stage as an operator leaves it: bootstrapped after the pools' CI image was pushed (so every
    template names it by digest), the hook connected, the functions deployed. The sandbox is reset afterwards."""
    sandbox = fresh_sandbox
    ecr = runtime.aws().client("ecr")
    repository = sandbox.config.pools[0].image.repository
    ecr.create_repository(repositoryName=repository)
    ecr.put_image(repositoryName=repository, imageManifest=CI_MANIFEST, imageTag="latest", imageDigest=CI_DIGEST)
    sandbox.bootstrap()
    yield sandbox
    sandbox.reset()


def doctor(sandbox: Any, *extra: str) -> tuple[int, dict[str, Any]]:
    """``fleetctl doctor --json`` as an operator of the sandbox runs it: its exit code and its report."""
    result = CliRunner().invoke(
        main,
        [
            "doctor",
            "--config",
            os.environ["RUNNER_FLEET_CONFIG"],
            "--stage",
            SANDBOX_STAGE,
            "--webhook-url",
            sandbox.server.webhook_url,
            "--json",
            *extra,
        ],
        catch_exceptions=False,
    )
    return result.exit_code, json.loads(result.output)


def failures(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    failed: dict[str, list[dict[str, Any]]] = {}
    for finding in report["checks"]:
        if not finding["ok"]:
            failed.setdefault(finding["check"], []).append(finding)
    return failed


def test_a_healthy_stage_passes_every_check(stage: Any) -> None:
    # when
    result = CliRunner().invoke(
        main,
        [
            "doctor",
            "--config",
            os.environ["RUNNER_FLEET_CONFIG"],
            "--stage",
            SANDBOX_STAGE,
            "--webhook-url",
            stage.server.webhook_url,
        ],
        catch_exceptions=False,
    )

    # then
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output
    checks = [line.split(":")[0].removeprefix("pass ") for line in result.output.splitlines()[:-1]]
    for check in ("config", "table", "queues", "parameters", "ami", "launch templates", "pool roles", "spot role"):
        assert check in checks
    for check in ("cache bucket", "ci images", "image pull access", "gitlab token", "webhook", "lambdas"):
        assert check in checks
    assert result.output.splitlines()[-1] == "14 checks, all passed"


def test_a_deleted_parameter_fails_the_parameters_check(stage: Any) -> None:
    # given
    name = stage.config.webhook.token_parameter
    runtime.aws().ssm.delete_parameter(Name=name)

    # when
    code, report = doctor(stage)

    # then
    assert code == 1
    [finding] = failures(report)["parameters"]
    assert finding["detail"] == f"{name} (webhook token) does not exist"
    assert "fleetctl bootstrap --config" in finding["fix"]


def test_a_removed_hook_fails_the_webhook_check(stage: Any) -> None:
    # given
    hooks = f"{stage.gitlab.url}/api/v4/projects/{stage.project_id}/hooks"
    headers = {"PRIVATE-TOKEN": GITLAB_OPERATOR_TOKEN}
    [hook] = requests.get(hooks, headers=headers, timeout=10).json()
    assert requests.delete(f"{hooks}/{hook['id']}", headers=headers, timeout=10).status_code == 204

    # when
    code, report = doctor(stage)

    # then
    assert code == 1
    [finding] = failures(report)["webhook"]
    assert "no longer exists in GitLab" in finding["detail"]
    assert finding["fix"].startswith("fleetctl gitlab connect")
    assert list(failures(report)) == ["webhook"]


def test_a_hook_with_another_url_fails_the_webhook_check(stage: Any) -> None:
    # given
    hooks = f"{stage.gitlab.url}/api/v4/projects/{stage.project_id}/hooks"
    headers = {"PRIVATE-TOKEN": GITLAB_OPERATOR_TOKEN}
    [hook] = requests.get(hooks, headers=headers, timeout=10).json()
    elsewhere = "https://old-api.example.com/api/webhooks/gitlab"
    answer = requests.put(f"{hooks}/{hook['id']}", headers=headers, json={"url": elsewhere}, timeout=10)
    assert answer.status_code == 200

    # when
    code, report = doctor(stage)

    # then
    assert code == 1
    [finding] = failures(report)["webhook"]
    assert f"its URL is {elsewhere}, not the deployed webhook's {stage.server.webhook_url}" in finding["detail"]
    assert f"--url {stage.server.webhook_url}" in finding["fix"]


def test_a_default_template_version_without_imdsv2_fails_the_templates_check(stage: Any) -> None:
    # given: someone made a new default version that lets any process read the metadata without a token
    ec2 = runtime.aws().ec2
    name = launch_template_name(stage.config.fleet, "docker")
    template = ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"][0]
    created = ec2.create_launch_template_version(
        LaunchTemplateId=template["LaunchTemplateId"],
        SourceVersion=str(template["DefaultVersionNumber"]),
        LaunchTemplateData={"MetadataOptions": {"HttpTokens": "optional", "HttpPutResponseHopLimit": 1}},
    )
    version = created["LaunchTemplateVersion"]["VersionNumber"]
    ec2.modify_launch_template(LaunchTemplateId=template["LaunchTemplateId"], DefaultVersion=str(version))

    # when
    code, report = doctor(stage)

    # then
    assert code == 1
    details = [finding["detail"] for finding in failures(report)["launch templates"]]
    assert any(
        f"{name} version {version} (default): MetadataOptions.HttpTokens is 'optional', not 'required'" in detail
        for detail in details
    ), details
    # Runners launch from the version the pool's item names, which is no longer the default.
    assert any("launches from version" in detail for detail in details), details


def test_an_ami_parameter_naming_an_image_of_another_architecture_fails_the_ami_check(stage: Any) -> None:
    # given: the x86_64 parameter names the arm64 runner AMI
    ssm = runtime.aws().ssm
    base = stage.config.ami_parameter
    arm = ssm.get_parameter(Name=f"{base}/arm64")["Parameter"]["Value"]
    ssm.put_parameter(Name=f"{base}/x86_64", Value=arm, Type="String", Overwrite=True)

    # when
    code, report = doctor(stage)

    # then
    assert code == 1
    findings = failures(report)["ami"]
    assert {finding["detail"].split(":")[0] for finding in findings} == {"pools[0](docker).ami", "pools[1](build).ami"}
    assert all(f"{arm} (from {base}/x86_64) is an arm64 image" in finding["detail"] for finding in findings)
    assert all("fleetctl ami publish" in finding["fix"] for finding in findings)


@pytest.mark.parametrize("broken", ["deleted", "no such image"])
def test_an_ami_parameter_naming_nothing_fails_the_ami_check(stage: Any, broken: str) -> None:
    # given
    ssm = runtime.aws().ssm
    name = f"{stage.config.ami_parameter}/x86_64"
    if broken == "deleted":
        ssm.delete_parameter(Name=name)
        expected = f"SSM parameter {name} does not exist"
    else:
        ssm.put_parameter(Name=name, Value="ami-0123456789abcdef0", Type="String", Overwrite=True)
        expected = f"no AMI: ami-0123456789abcdef0 (from {name}) not found"

    # when
    code, report = doctor(stage)

    # then
    assert code == 1
    findings = failures(report)["ami"]
    assert len(findings) == 2
    assert all(expected in finding["detail"] for finding in findings), findings


def test_a_fleet_token_without_a_scope_fails_the_gitlab_token_check(stage: Any) -> None:
    # given: the stored token cannot create runners
    token = "glpat-doctor-no-create-runner"
    stage.gitlab.add_token(token, scopes=("read_api", "manage_runner", "api"))
    stage.gitlab.add_token(token + "-read", scopes=("read_api",))
    runtime.aws().ssm.put_parameter(
        Name=stage.config.gitlab.token_parameter, Value=token + "-read", Type="SecureString", Overwrite=True
    )

    # when
    code, report = doctor(stage, "--gitlab-token", GITLAB_OPERATOR_TOKEN)

    # then
    assert code == 1
    [finding] = failures(report)["gitlab token"]
    assert "missing scope create_runner or api" in finding["detail"]
    assert "GITLAB_TOKEN=glpat-... fleetctl bootstrap" in finding["fix"]
    assert token not in json.dumps(report)


def test_a_function_not_deployed_fails_the_lambdas_check(stage: Any) -> None:
    # given
    runtime.aws().client("lambda").delete_function(FunctionName="runner-fleet-dev-reconcile")

    # when
    code, report = doctor(stage)

    # then
    assert code == 1
    [finding] = failures(report)["lambdas"]
    assert finding == {
        "check": "lambdas",
        "ok": False,
        "detail": "runner-fleet-dev-reconcile is not deployed",
        "fix": f"chalice deploy --stage {SANDBOX_STAGE}",
    }


def test_a_deleted_dead_letter_queue_fails_the_queues_check(stage: Any) -> None:
    # given
    sqs = runtime.aws().sqs
    dlq = stage.config.state.dead_letter_queue
    sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=dlq)["QueueUrl"])

    # when
    code, report = doctor(stage)

    # then
    assert code == 1
    details = [finding["detail"] for finding in failures(report)["queues"]]
    assert details == [f"{dlq}: missing", f"{stage.config.state.jobs_queue}: its dead-letter queue is missing"]


def test_a_pool_role_holding_more_than_its_policy_fails_the_roles_check(stage: Any) -> None:
    # given: someone attached a managed policy granting everything to the docker pool's role
    iam = runtime.aws().client("iam")
    role = "runner-fleet-dev-docker-runner"
    everything = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    arn = iam.create_policy(PolicyName="ci-everything", PolicyDocument=json.dumps(everything))["Policy"]["Arn"]
    iam.attach_role_policy(RoleName=role, PolicyArn=arn)

    # when
    code, report = doctor(stage)

    # then
    assert code == 1
    [finding] = failures(report)["pool roles"]
    assert finding["detail"] == f"{role} has managed policy {arn} attached: more than pool docker needs"
    assert finding["fix"] == f"aws iam detach-role-policy --role-name {role} --policy-arn {arn}"
