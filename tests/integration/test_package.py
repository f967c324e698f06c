"""``make package``: each stage packages into a CloudFormation template that cfn-lint passes clean, with the stack's
merge template in it; and a package index out of reach fails the packaging, never yields a zip without the
Lambdas' dependencies.

This runs the real ``chalice package`` (which downloads requirements.txt from the package index, or reuses the
zip it built before for the same code) and the real cfn-lint. Without the index the test fails, as packaging
does: a deployment cannot be made without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from chalicelib.config import StateOwner, load_config
from fleetctl.lambda_policies import CHALICE_CONFIG, stage_config_path
from fleetctl.package import PROJECT_DIR, PackageError, package
from fleetctl.state_resources import create_table_arguments


def _resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r.get("Type") == kind}


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_each_stage_packages_into_a_template_cfn_lint_passes(stage: str, tmp_path: Path) -> None:
    # given: the stage's file, as its Lambdas read it
    config = load_config(stage_config_path(CHALICE_CONFIG, stage))

    # when
    try:
        result = package(stage, tmp_path)
    except PackageError as exc:
        pytest.fail(f"make package STAGE={stage} failed: {exc}")

    # then: cfn-lint reported nothing, and the merge template is in the stack
    assert result.lint_output == ""
    template = json.loads(result.template.read_text())
    resources = template["Resources"]
    mapping = resources["ScaleUp"]["Properties"]["Events"]["ScaleUpSqsEventSource"]["Properties"]
    assert mapping["Queue"]["Fn::Sub"].endswith(f":{config.state.jobs_queue}")
    assert (mapping["BatchSize"], mapping["MaximumBatchingWindowInSeconds"]) == (50, 1)
    assert mapping["ScalingConfig"] == {"MaximumConcurrency": 5}
    (throttle,) = resources["RestAPI"]["Properties"]["MethodSettings"]
    assert throttle["ThrottlingRateLimit"] > 0 and throttle["ThrottlingBurstLimit"] > 0
    # each function is named as its policy's log grant names it, so it can write its logs and EMF metrics
    for name, function in _resources(template, "AWS::Serverless::Function").items():
        role = resources[function["Properties"]["Role"]["Fn::GetAtt"][0]]
        (logs,) = [
            s for p in role["Properties"]["Policies"] for s in p["PolicyDocument"]["Statement"] if s["Sid"] == "OwnLogs"
        ]
        log_group = f"log-group:/aws/lambda/{function['Properties']['FunctionName']}"
        assert any(resource.endswith(log_group) for resource in logs["Resource"]), name
    # no EventBridge-invoked handler drops an event: EventBridge's undelivered ones and Lambda's failed ones both
    # go to the events dead-letter queue
    for function in ("InstanceState", "InstanceInterruption", "Images"):
        properties = resources[function]["Properties"]
        (event,) = properties["Events"].values()
        assert event["Type"] == "EventBridgeRule"
        assert event["Properties"]["DeadLetterConfig"]["Arn"] == {"Fn::GetAtt": ["EventsDeadLetterQueue", "Arn"]}
        on_failure = properties["EventInvokeConfig"]["DestinationConfig"]["OnFailure"]
        assert on_failure == {"Type": "SQS", "Destination": {"Fn::GetAtt": ["EventsDeadLetterQueue", "Arn"]}}
    # the alarms the runbook explains, each sent to the stack's topic
    alarms = {
        r["Properties"]["AlarmName"]: r["Properties"] for r in _resources(template, "AWS::CloudWatch::Alarm").values()
    }
    assert set(alarms) == {
        f"{config.fleet}-{name}"
        for name in (
            "jobs-dead-lettered",
            "events-dead-lettered",
            "orphans-reaped",
            "launch-errors",
            "webhooks-refused",
            "invariant-violations",
            "hooks-disabled",
            "reconcile-failing",
        )
    }
    runbook = (PROJECT_DIR / "docs" / "operations-runbook.md").read_text()
    for name, alarm in alarms.items():
        assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]
        assert f"### {name.removeprefix(config.fleet + '-')}" in runbook
    (dlq_alarm,) = [a for n, a in alarms.items() if n.endswith("-jobs-dead-lettered")]
    assert dlq_alarm["Dimensions"] == [{"Name": "QueueName", "Value": config.state.dead_letter_queue}]
    # the dashboard shows each pool's queue wait
    (dashboard,) = _resources(template, "AWS::CloudWatch::Dashboard").values()
    body = json.loads(dashboard["Properties"]["DashboardBody"]["Fn::Sub"])
    waits = [m for w in body["widgets"] for m in w["properties"]["metrics"] if "QueueWaitSeconds" in m]
    assert {m[5] for m in waits} == {pool.name for pool in config.pools}
    # what fleetctl bootstrap owns is not created by the stack too
    assert not _resources(template, "AWS::DynamoDB::Table")
    queues = {r["Properties"]["QueueName"] for r in _resources(template, "AWS::SQS::Queue").values()}
    assert queues == {f"{config.fleet}-events-dlq"}
    assert not queues & {config.state.jobs_queue, config.state.dead_letter_queue}


def test_an_unreachable_package_index_fails_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # given: a copy of the project with no deployment package built yet, and a package index nobody answers at
    project = _project_copy(tmp_path, keep_deployments=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")

    # when / then
    with pytest.raises(PackageError, match="package index"):
        package("dev", tmp_path / "out", project_dir=project)


def _project_copy(root: Path, *, keep_deployments: bool = True) -> Path:
    """A copy of the project Chalice can package; ``keep_deployments`` keeps the deployment packages built before."""
    project = root / "project"
    project.mkdir()
    for name in ("app.py", "requirements.txt"):
        shutil.copy(PROJECT_DIR / name, project / name)
    shutil.copytree(PROJECT_DIR / "chalicelib", project / "chalicelib", ignore=shutil.ignore_patterns("__pycache__"))
    skipped = ("__pycache__",) if keep_deployments else ("deployments",)
    shutil.copytree(PROJECT_DIR / ".chalice", project / ".chalice", ignore=shutil.ignore_patterns(*skipped))
    return project


def test_a_stage_whose_state_the_stack_owns_gets_the_table_and_queues_kept_on_deletion(tmp_path: Path) -> None:
    # given: the dev stage with state.owner: stack
    project = _project_copy(tmp_path)
    stage_file = project / "chalicelib" / "stages" / "dev.yaml"
    stage_file.write_text(stage_file.read_text().replace("  owner: bootstrap\n", "  owner: stack\n"))
    config = load_config(stage_file)
    assert config.state.owner is StateOwner.STACK

    # when
    try:
        result = package("dev", tmp_path / "out", project_dir=project)
    except PackageError as exc:
        pytest.fail(f"make package STAGE=dev with state.owner: stack failed: {exc}")

    # then: cfn-lint reported nothing, and the stack defines the table bootstrap would have made
    assert result.lint_output == ""
    template = json.loads(result.template.read_text())
    resources = template["Resources"]
    (table,) = _resources(template, "AWS::DynamoDB::Table").values()
    bootstraps = create_table_arguments(config.state.table, config.fleet)
    properties = table["Properties"]
    assert properties["TableName"] == config.state.table
    assert properties["KeySchema"] == bootstraps["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
    assert properties["GlobalSecondaryIndexes"] == bootstraps["GlobalSecondaryIndexes"]
    assert {index["IndexName"] for index in properties["GlobalSecondaryIndexes"]} == {
        "idle-runners",
        "fleet-records",
        "token-deadlines",
    }
    assert properties["AttributeDefinitions"] == bootstraps["AttributeDefinitions"]
    assert properties["BillingMode"] == "PAY_PER_REQUEST"
    assert properties["SSESpecification"] == {"SSEEnabled": True}
    assert properties["TimeToLiveSpecification"] == {"AttributeName": "ttl", "Enabled": True}
    # and both queues, the jobs queue redriving to its dead-letter queue after 5 receives
    queues = {r["Properties"]["QueueName"]: r for r in _resources(template, "AWS::SQS::Queue").values()}
    assert set(queues) == {config.state.jobs_queue, config.state.dead_letter_queue, f"{config.fleet}-events-dlq"}
    jobs, dead_letters = queues[config.state.jobs_queue], queues[config.state.dead_letter_queue]
    assert jobs["Properties"]["VisibilityTimeout"] == 360
    assert jobs["Properties"]["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["JobsDeadLetterQueue", "Arn"]},
        "maxReceiveCount": 5,
    }
    assert dead_letters["Properties"]["MessageRetentionPeriod"] == 14 * 24 * 3600
    # deleting the stack, or replacing one of them, keeps the fleet's state
    for resource in (table, jobs, dead_letters):
        assert (resource["DeletionPolicy"], resource["UpdateReplacePolicy"]) == ("Retain", "Retain")
    # scale-up's trigger reads the stack's jobs queue, and no function starts before the state exists
    mapping = resources["ScaleUp"]["Properties"]["Events"]["ScaleUpSqsEventSource"]["Properties"]
    assert mapping["Queue"]["Fn::Sub"].endswith(f":{config.state.jobs_queue}")
    for name in _resources(template, "AWS::Serverless::Function"):
        assert set(resources[name]["DependsOn"]) == {"StateTable", "JobsQueue", "JobsDeadLetterQueue"}, name
