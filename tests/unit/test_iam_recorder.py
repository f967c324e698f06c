"""The suite-wide IAM check's own parts: calls translated into the requests AWS authorizes, and the verdict."""

from __future__ import annotations

from pathlib import Path

from tests.iam_recorder import Request, _dynamodb, _sqs, _ssm, judge

PROJECT_DIR = Path(__file__).resolve().parents[2]
DEV = str(PROJECT_DIR / "chalicelib" / "stages" / "dev.yaml")
TABLE = "arn:aws:dynamodb:us-east-1:123456789012:table/runner-fleet-dev"


def test_a_transaction_is_authorized_item_by_item() -> None:
    # given a transaction that updates a runner and puts a launch
    params = {
        "TransactItems": [
            {"Update": {"TableName": "runner-fleet-dev", "Key": {"pk": {"S": "RUNNER#i-1"}}}},
            {"Put": {"TableName": "runner-fleet-dev", "Item": {"pk": {"S": "LAUNCH#a"}, "n": {"N": "1"}}}},
            {"ConditionCheck": {"TableName": "runner-fleet-dev", "Key": {"pk": {"S": "POOL#docker"}}}},
        ]
    }

    # when
    requests = list(_dynamodb("us-east-1", "TransactWriteItems", params))

    # then each item is its own action, with its partition key as the leading key
    assert [(action, resource, context) for action, resource, context, _ in requests] == [
        ("dynamodb:UpdateItem", TABLE, (("dynamodb:LeadingKeys", ("RUNNER#i-1",)),)),
        ("dynamodb:PutItem", TABLE, (("dynamodb:LeadingKeys", ("LAUNCH#a",)),)),
        ("dynamodb:ConditionCheckItem", TABLE, (("dynamodb:LeadingKeys", ("POOL#docker",)),)),
    ]


def test_queue_urls_and_parameter_names_become_arns() -> None:
    [(action, queue, _, _)] = _sqs(
        "us-east-1", "sqs:SendMessage", "SendMessage", {"QueueUrl": "http://127.0.0.1:5000/123456789012/jobs"}
    )
    assert (action, queue) == ("sqs:SendMessage", "arn:aws:sqs:us-east-1:123456789012:jobs")
    tagged = list(_ssm("us-east-1", "ssm:PutParameter", "PutParameter", {"Name": "/a/b", "Tags": [{"Key": "k"}]}))
    assert [(a, r) for a, r, _, _ in tagged] == [
        ("ssm:PutParameter", "arn:aws:ssm:us-east-1:123456789012:parameter/a/b"),
        ("ssm:AddTagsToResource", "arn:aws:ssm:us-east-1:123456789012:parameter/a/b"),
    ]


def test_the_verdict_denies_what_no_statement_allows_and_lists_what_was_used() -> None:
    # given one allowed and two refused webhook requests, and one the recorder could not translate
    job = Request("webhook", DEV, "UpdateItem", "dynamodb:UpdateItem", TABLE, (("dynamodb:LeadingKeys", ("JOB#1:2",)),))
    pool = Request("webhook", DEV, "UpdateItem", "dynamodb:UpdateItem", TABLE, (("dynamodb:LeadingKeys", ("POOL#x",)),))
    launch = Request("webhook", DEV, "CreateFleet", "ec2:CreateFleet", "arn:aws:ec2:us-east-1:123456789012:fleet/*")
    unknown = Request("scale-up", DEV, "RunInstances", "ec2:RunInstances", "?", (), "no translation")

    # when
    verdict = judge([job, pool, launch, unknown])

    # then
    assert sorted((d["function"], d["call"]) for d in verdict["denied"]) == [
        ("scale-up", "RunInstances"),
        ("webhook", "CreateFleet"),
        ("webhook", "UpdateItem"),
    ]
    assert verdict["used"]["webhook"] == ["RecordJobEvents"]
