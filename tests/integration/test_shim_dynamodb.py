"""The AWS shim's DynamoDB rules, through boto3 against the local AWS: conflicts and idempotency tokens."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from chalicelib.aws import AwsClients
from fleetctl.sandbox.aws_rules.dynamodb import TransactionConflicts
from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, parse_request
from fleetctl.sandbox.local_aws import LocalAws
from tests.faults import WireFaults

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def dynamodb(local_aws: LocalAws) -> Any:
    return AwsClients().dynamodb


@pytest.fixture
def table(local_aws: LocalAws, dynamodb: Any) -> Iterator[str]:
    name = f"shim-{uuid.uuid4().hex[:8]}"
    dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    yield name
    local_aws.reset()


def _add(table: str, pk: str, n: int = 1) -> dict[str, Any]:
    return {
        "Update": {
            "TableName": table,
            "Key": {"pk": {"S": pk}},
            "UpdateExpression": "ADD n :n",
            "ExpressionAttributeValues": {":n": {"N": str(n)}},
        }
    }


def _count(dynamodb: Any, table: str, pk: str) -> int:
    item = dynamodb.get_item(TableName=table, Key={"pk": {"S": pk}}, ConsistentRead=True).get("Item")
    return int(item["n"]["N"]) if item else 0


# -- transaction conflicts -------------------------------------------------------------------------------------------


def test_an_injected_conflict_cancels_the_transaction_with_a_reason_per_item(
    local_aws: LocalAws, dynamodb: Any, table: str
) -> None:
    """DynamoDB API reference, TransactWriteItems, Errors (TransactionCanceledException, reason
    ``TransactionConflict``), and the developer guide's "Transaction conflict handling in DynamoDB":
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_TransactWriteItems.html
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/transaction-apis.html#transaction-conflict-handling
    """
    # given one conflict injected on the pool items
    local_aws.shim("transaction-conflicts", "inject", prefix="POOL#", times=1)
    writes = [_add(table, "LAUNCH#1"), _add(table, "POOL#docker")]
    # when a transaction touches one
    with WireFaults(dynamodb) as faults, pytest.raises(ClientError) as refused:
        dynamodb.transact_write_items(TransactItems=writes)
    # then it is cancelled, the pool item named as the conflict, nothing applied, and botocore did not retry it
    error = refused.value.response
    assert error["Error"]["Code"] == "TransactionCanceledException"
    assert error["CancellationReasons"] == [
        {"Code": "None"},
        {"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"},
    ]
    assert "[None, TransactionConflict]" in error["Error"]["Message"]
    assert faults.attempts("TransactWriteItems") == 1
    assert _count(dynamodb, table, "POOL#docker") == 0
    # and the next one goes through
    dynamodb.transact_write_items(TransactItems=writes)
    assert _count(dynamodb, table, "POOL#docker") == 1
    assert local_aws.shim("transaction-conflicts", "status")["fired"] == 1


def test_an_injected_conflict_refuses_a_single_item_write_only_when_asked(
    local_aws: LocalAws, dynamodb: Any, table: str
) -> None:
    """Developer guide, "Transaction conflict handling in DynamoDB": a PutItem, UpdateItem or DeleteItem on an
    item an ongoing transaction holds is refused with TransactionConflictException:
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/transaction-apis.html#transaction-conflict-handling
    """
    local_aws.shim("transaction-conflicts", "inject", prefix="RUNNER#", times=1, operations=["UpdateItem"])
    # a transaction on that item, and a write to another item, are not touched
    dynamodb.transact_write_items(TransactItems=[_add(table, "RUNNER#i-1")])
    dynamodb.update_item(**_add(table, "POOL#x")["Update"])
    with pytest.raises(ClientError) as refused:
        dynamodb.update_item(**_add(table, "RUNNER#i-1")["Update"])
    assert refused.value.response["Error"]["Code"] == "TransactionConflictException"
    assert _count(dynamodb, table, "RUNNER#i-1") == 1


def test_a_configuration_naming_an_unknown_operation_is_refused(local_aws: LocalAws) -> None:
    """The shim's own admin API: a conflict applies to the writes DynamoDB documents as conflicting only."""
    with pytest.raises(ValueError, match="GetItem"):
        local_aws.shim("transaction-conflicts", "inject", prefix="POOL#", operations=["GetItem"])


def _transaction_request(table: str, *pks: str, operation: str = "TransactWriteItems") -> AwsRequest:
    import io
    import json

    if operation == "TransactWriteItems":
        params: dict[str, Any] = {"TransactItems": [_add(table, pk) for pk in pks]}
    else:
        params = _add(table, pks[0])["Update"]
    body = json.dumps(params).encode()
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/",
        "CONTENT_LENGTH": str(len(body)),
        "CONTENT_TYPE": "application/x-amz-json-1.0",
        "wsgi.input": io.BytesIO(body),
        "HTTP_X_AMZ_TARGET": f"DynamoDB_20120810.{operation}",
        "HTTP_AUTHORIZATION": "AWS4-HMAC-SHA256 Credential=t/20261129/us-east-1/dynamodb/aws4_request, S=h",
    }
    return parse_request(environ, body)


def test_a_write_arriving_while_a_transaction_holds_its_item_conflicts() -> None:
    """Developer guide, "Transaction conflict handling in DynamoDB": a transaction conflicts with another
    ongoing transaction on one of its items, and a single-item write with an ongoing transaction on its item;
    a transaction on other items, and a transaction after a single-item write, do not:
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/transaction-apis.html#transaction-conflict-handling
    """
    # given a transaction on POOL#a that moto is still applying
    rule = TransactionConflicts()
    entered, release = threading.Event(), threading.Event()

    def slow_moto(_: AwsRequest) -> AwsResponse:
        entered.set()
        release.wait(10)
        return AwsResponse(200, [], b"{}")

    def moto(_: AwsRequest) -> AwsResponse:
        return AwsResponse(200, [], b"{}")

    first: list[AwsResponse] = []
    worker = threading.Thread(
        target=lambda: first.append(rule.handle(_transaction_request("t", "POOL#a", "LAUNCH#1"), slow_moto))
    )
    worker.start()
    assert entered.wait(10)
    # when other writes arrive meanwhile
    conflicting = rule.handle(_transaction_request("t", "LAUNCH#2", "POOL#a"), moto)
    single = rule.handle(_transaction_request("t", "POOL#a", operation="UpdateItem"), moto)
    elsewhere = rule.handle(_transaction_request("t", "POOL#b"), moto)
    release.set()
    worker.join()
    after = rule.handle(_transaction_request("t", "POOL#a"), moto)
    # then those on POOL#a conflict, with the reasons in the transaction's order, and the rest go through
    assert conflicting.status == 400
    assert conflicting.json()["CancellationReasons"] == [
        {"Code": "None"},
        {"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"},
    ]
    assert (single.status, single.json()["__type"].rsplit("#", 1)[1]) == (400, "TransactionConflictException")
    assert (elsewhere.status, after.status, first[0].status) == (200, 200, 200)


# -- the transaction's idempotency token -------------------------------------------------------------------------------


def test_a_repeated_token_with_the_same_request_succeeds_without_applying_again(
    local_aws: LocalAws, dynamodb: Any, table: str
) -> None:
    """DynamoDB API reference, TransactWriteItems, ClientRequestToken: "multiple identical calls have the same
    effect as one single call":
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_TransactWriteItems.html#DDB-TransactWriteItems-request-ClientRequestToken
    """
    token = str(uuid.uuid4())
    for _ in range(3):
        dynamodb.transact_write_items(TransactItems=[_add(table, "POOL#a")], ClientRequestToken=token)
    assert _count(dynamodb, table, "POOL#a") == 1
    # a call without a token of its own gets a fresh one from botocore, so it applies
    dynamodb.transact_write_items(TransactItems=[_add(table, "POOL#a")])
    assert _count(dynamodb, table, "POOL#a") == 2


def test_a_retry_of_a_call_whose_answer_was_lost_applies_once(local_aws: LocalAws, dynamodb: Any, table: str) -> None:
    """DynamoDB API reference, TransactWriteItems, ClientRequestToken: botocore fills the token once per call
    (the idempotencyToken trait), so its retry of a timed-out call carries the same token and changes nothing:
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_TransactWriteItems.html#DDB-TransactWriteItems-request-ClientRequestToken
    """
    with WireFaults(dynamodb) as faults:
        faults.lose_answer("TransactWriteItems")
        dynamodb.transact_write_items(TransactItems=[_add(table, "POOL#a")])
    assert faults.attempts("TransactWriteItems") == 2
    assert _count(dynamodb, table, "POOL#a") == 1


def test_a_repeated_token_with_another_request_is_a_mismatch(local_aws: LocalAws, dynamodb: Any, table: str) -> None:
    """DynamoDB API reference, TransactWriteItems, Errors (IdempotentParameterMismatchException) and
    ClientRequestToken ("a change in other parameters within the 10-minute idempotency window"):
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_TransactWriteItems.html
    """
    token = str(uuid.uuid4())
    dynamodb.transact_write_items(TransactItems=[_add(table, "POOL#a")], ClientRequestToken=token)
    with pytest.raises(ClientError) as refused:
        dynamodb.transact_write_items(TransactItems=[_add(table, "POOL#a", 2)], ClientRequestToken=token)
    assert refused.value.response["Error"]["Code"] == "IdempotentParameterMismatchException"
    assert _count(dynamodb, table, "POOL#a") == 1


def test_a_token_is_forgotten_ten_minutes_after_its_call_completed(
    local_aws: LocalAws, dynamodb: Any, table: str
) -> None:
    """DynamoDB API reference, TransactWriteItems, ClientRequestToken: "valid for 10 minutes after the first
    request that uses it is completed. After 10 minutes, any request with the same client token is treated as a
    new request":
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_TransactWriteItems.html#DDB-TransactWriteItems-request-ClientRequestToken
    """
    token = str(uuid.uuid4())
    dynamodb.transact_write_items(TransactItems=[_add(table, "POOL#a")], ClientRequestToken=token)
    local_aws.shim("transaction-tokens", "advance", seconds=599)
    dynamodb.transact_write_items(TransactItems=[_add(table, "POOL#a")], ClientRequestToken=token)
    assert _count(dynamodb, table, "POOL#a") == 1
    local_aws.shim("transaction-tokens", "advance", seconds=2)
    dynamodb.transact_write_items(TransactItems=[_add(table, "POOL#a")], ClientRequestToken=token)
    assert _count(dynamodb, table, "POOL#a") == 2


def test_a_cancelled_transaction_is_not_remembered(local_aws: LocalAws, dynamodb: Any, table: str) -> None:
    """DynamoDB API reference, TransactWriteItems, ClientRequestToken: the token makes a *successful* call
    idempotent; a call that was cancelled changed nothing and may be sent again:
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_TransactWriteItems.html#DDB-TransactWriteItems-request-ClientRequestToken
    """
    token = str(uuid.uuid4())
    local_aws.shim("transaction-conflicts", "inject", prefix="POOL#", times=1)
    with pytest.raises(ClientError):
        dynamodb.transact_write_items(TransactItems=[_add(table, "POOL#a")], ClientRequestToken=token)
    dynamodb.transact_write_items(TransactItems=[_add(table, "POOL#a")], ClientRequestToken=token)
    assert _count(dynamodb, table, "POOL#a") == 1


# -- throttling ------------------------------------------------------------------------------------------------------


def test_a_throttling_burst_botocore_outlasts_is_absorbed_and_a_longer_one_reaches_the_caller(
    local_aws: LocalAws, dynamodb: Any, table: str
) -> None:
    """A throttled request is refused with ProvisionedThroughputExceededException and its ThrottlingReasons
    (DynamoDB API reference, Common Errors); botocore's standard retry mode retries it, so a burst shorter than
    its attempts is never seen, and a longer one is."""
    # given a burst of two throttled writes: botocore's retries carry the write through
    local_aws.shim("dynamodb-throttling", "burst", calls=2, operations=["TransactWriteItems"])
    with WireFaults(dynamodb) as faults:
        dynamodb.transact_write_items(TransactItems=[_add(table, "a")])
    assert faults.attempts("TransactWriteItems") == 3
    assert _count(dynamodb, table, "a") == 1

    # when a burst outlasts every attempt
    local_aws.shim("dynamodb-throttling", "burst", calls=100)
    try:
        with pytest.raises(ClientError) as refused:
            dynamodb.get_item(TableName=table, Key={"pk": {"S": "a"}})
    finally:
        local_aws.shim("dynamodb-throttling", "clear")

    # then the caller sees the throttle, with its reason; nothing was applied twice
    error = refused.value.response
    assert error["Error"]["Code"] == "ProvisionedThroughputExceededException"
    assert error["ThrottlingReasons"][0]["reason"] == "TableReadKeyRangeThroughputExceeded"
    assert local_aws.shim("dynamodb-throttling", "status")["left"] == 0
    assert _count(dynamodb, table, "a") == 1
