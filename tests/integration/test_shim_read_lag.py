"""The AWS shim's read-lag rules, through boto3 against the local AWS: EC2's DescribeInstances trailing its
launches, BatchGetItem's unprocessed keys, and DynamoDB's global secondary indexes trailing their table."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from chalicelib.aws import AwsClients
from fleetctl.sandbox.local_aws import LocalAws

pytestmark = pytest.mark.timeout(120)

# One of moto's Amazon Linux images; a listing of every Amazon image is large enough to time out a busy machine.
AL2023 = [{"Name": "name", "Values": ["al2023-ami-2023*"]}]


IDLE = "idle"  # KEYS_ONLY, as bootstrap's idle-runners index
LIVE = "live"  # ALL, as bootstrap's fleet-records index


@pytest.fixture(autouse=True)
def fresh(local_aws: LocalAws) -> Iterator[None]:
    """Every test makes its own resources; a reset afterwards forgets them and puts every rule back to its
    default, so one test's lag never reaches the next."""
    yield
    local_aws.reset()


@pytest.fixture(scope="module")
def clients(local_aws: LocalAws) -> AwsClients:
    return AwsClients()


# -- EC2: DescribeInstances trails the launches ------------------------------------------------------------------------


def _template(clients: AwsClients) -> str:
    image = clients.ec2.describe_images(Owners=["amazon"], Filters=AL2023)["Images"][0]["ImageId"]
    name = f"lag-{uuid.uuid4().hex[:8]}"
    clients.ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData={"ImageId": image})
    return name


@pytest.fixture
def template(clients: AwsClients) -> str:
    return _template(clients)


def _run(clients: AwsClients, template: str, tag: str, count: int = 1) -> list[str]:
    answer = clients.ec2.run_instances(
        LaunchTemplate={"LaunchTemplateName": template},
        MinCount=count,
        MaxCount=count,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "batch", "Value": tag}]}],
    )
    return sorted(instance["InstanceId"] for instance in answer["Instances"])


def _described(answer: dict[str, Any]) -> list[str]:
    return sorted(i["InstanceId"] for reservation in answer["Reservations"] for i in reservation["Instances"])


def _tagged(clients: AwsClients, tag: str) -> dict[str, Any]:
    return dict(clients.ec2.describe_instances(Filters=[{"Name": "tag:batch", "Values": [tag]}]))


def test_a_new_instance_is_missing_from_describe_instances_until_the_lag_passes(
    local_aws: LocalAws, clients: AwsClients, template: str
) -> None:
    """ "Eventual consistency in the Amazon EC2 API": a resource just created "will eventually be visible to other
    commands"; until then a describe does not know it:
    https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html
    """
    # given a 30 second lag, an instance launched before it, and one launched 31 seconds later
    local_aws.shim("ec2-describe-lag", "set", seconds=30)
    older = _run(clients, template, "older")
    local_aws.shim("ec2-describe-lag", "advance", seconds=31)
    newer = _run(clients, template, "newer", count=2)
    # when DescribeInstances is asked without and with a filter
    everything = _described(clients.ec2.describe_instances())
    filtered = _tagged(clients, "newer")
    # then the new instances are in neither, and their reservation, left empty, is not answered at all
    assert set(older) <= set(everything)
    assert not set(newer) & set(everything)
    assert filtered["Reservations"] == []
    assert _described(_tagged(clients, "older")) == older
    # and once the lag has passed they are there
    local_aws.shim("ec2-describe-lag", "advance", seconds=31)
    assert _described(_tagged(clients, "newer")) == newer
    assert local_aws.shim("ec2-describe-lag", "status")["hidden"] >= 4


def test_describing_a_fleet_instance_by_id_during_the_lag_is_not_found(
    local_aws: LocalAws, clients: AwsClients, template: str
) -> None:
    """ "Eventual consistency in the Amazon EC2 API" (``InvalidInstanceID.NotFound`` right after a launch, with
    DescribeInstances among the commands affected) and DescribeInstances ("If you specify an instance ID that is
    not valid, an error is returned": the whole call fails):
    https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html
    https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_DescribeInstances.html
    """
    # given an instance known for long, and a fleet launched now under a lag
    [known] = _run(clients, template, "known")
    local_aws.shim("ec2-describe-lag", "set", seconds=30)
    fleet = clients.ec2.create_fleet(
        Type="instant",
        LaunchTemplateConfigs=[
            {
                "LaunchTemplateSpecification": {"LaunchTemplateName": template, "Version": "$Default"},
                "Overrides": [{"InstanceType": "m7i.large"}],
            }
        ],
        TargetCapacitySpecification={"TotalTargetCapacity": 2, "DefaultTargetCapacityType": "on-demand"},
    )
    launched = sorted(i for entry in fleet["Instances"] for i in entry["InstanceIds"])
    assert len(launched) == 2
    # when the caller describes them by id, beside the known one
    with pytest.raises(ClientError) as refused:
        clients.ec2.describe_instances(InstanceIds=[known, *launched])
    # then the call fails as a whole, a client error naming the fleet's instances only
    error = refused.value.response
    assert error["Error"]["Code"] == "InvalidInstanceID.NotFound"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert error["Error"]["Message"] == f"The instance IDs '{launched[0]}, {launched[1]}' do not exist"
    assert _described(clients.ec2.describe_instances(InstanceIds=[known])) == [known]
    # and after the lag the same call answers all three
    local_aws.shim("ec2-describe-lag", "advance", seconds=31)
    assert _described(clients.ec2.describe_instances(InstanceIds=[known, *launched])) == sorted([known, *launched])


def test_describe_instances_does_not_lag_by_default_nor_after_a_reset(
    local_aws: LocalAws, clients: AwsClients, template: str
) -> None:
    """The rule is off until configured, and ``POST /moto-api/reset`` puts it back to off."""
    assert _described(_tagged(clients, "first")) == []
    first = _run(clients, template, "first")
    assert _described(_tagged(clients, "first")) == first
    local_aws.shim("ec2-describe-lag", "set", seconds=30)
    local_aws.reset()
    second = _run(clients, _template(clients), "second")
    assert _described(_tagged(clients, "second")) == second
    assert local_aws.shim("ec2-describe-lag", "status")["seconds"] == 0
    with pytest.raises(ValueError, match="seconds"):
        local_aws.shim("ec2-describe-lag", "set", seconds=-1)


# -- DynamoDB: BatchGetItem leaves keys unprocessed --------------------------------------------------------------------


@pytest.fixture
def records(clients: AwsClients) -> str:
    """A table with items RECORD#0 to RECORD#19 (with a state each); RECORD#20 to RECORD#24 have none."""
    name = f"batch-{uuid.uuid4().hex[:8]}"
    clients.dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    for n in range(20):
        clients.dynamodb.put_item(TableName=name, Item={"pk": {"S": f"RECORD#{n}"}, "state": {"S": f"s{n}"}})
    return name


def _keys(*numbers: int) -> list[dict[str, Any]]:
    return [{"pk": {"S": f"RECORD#{n}"}} for n in numbers]


def _pks(entries: list[dict[str, Any]]) -> list[str]:
    return sorted(str(entry["pk"]["S"]) for entry in entries)


def test_an_injected_call_leaves_keys_unprocessed_in_the_form_of_the_request(
    local_aws: LocalAws, clients: AwsClients, records: str
) -> None:
    """DynamoDB API reference, BatchGetItem: a partial result names the unread keys in ``UnprocessedKeys``, "in the
    same form as RequestItems" (``Keys`` with the request's ``ProjectionExpression``, ``ExpressionAttributeNames``
    and ``ConsistentRead``), so that it "can be provided directly to a subsequent BatchGetItem operation":
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_BatchGetItem.html
    """
    # given one call injected to leave keys unprocessed
    local_aws.shim("dynamodb-unprocessed-keys", "inject", times=1)
    request = {
        records: {
            "Keys": _keys(*range(8), 21),
            "ConsistentRead": True,
            "ProjectionExpression": "pk, #s",
            "ExpressionAttributeNames": {"#s": "state"},
        }
    }
    # when a batch of nine keys (one without an item) is read
    answer = clients.dynamodb.batch_get_item(RequestItems=request)
    # then some keys come back unprocessed, in the request's form, and their items are not in Responses
    deferred = answer["UnprocessedKeys"][records]
    assert deferred["Keys"]
    assert {name: value for name, value in deferred.items() if name != "Keys"} == {
        "ConsistentRead": True,
        "ProjectionExpression": "pk, #s",
        "ExpressionAttributeNames": {"#s": "state"},
    }
    answered = _pks(answer["Responses"][records])
    assert not set(answered) & set(_pks(deferred["Keys"]))
    assert set(answered) | set(_pks(deferred["Keys"])) >= {f"RECORD#{n}" for n in range(8)}
    assert all(set(item) == {"pk", "state"} for item in answer["Responses"][records])
    # and the unprocessed part, sent again as it came, is answered in full
    again = clients.dynamodb.batch_get_item(RequestItems=answer["UnprocessedKeys"])
    assert again["UnprocessedKeys"] == {}
    assert sorted(answered + _pks(again["Responses"][records])) == [f"RECORD#{n}" for n in range(8)]
    assert local_aws.shim("dynamodb-unprocessed-keys", "status")["fired"] == 1


def test_a_call_may_leave_every_key_unprocessed(local_aws: LocalAws, clients: AwsClients, records: str) -> None:
    """DynamoDB API reference, BatchGetItem: a successful call may read none of the items, answering an empty
    ``Responses`` list for the table and every key in ``UnprocessedKeys``:
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_BatchGetItem.html
    """
    local_aws.shim("dynamodb-unprocessed-keys", "inject", times=1)
    answer = clients.dynamodb.batch_get_item(RequestItems={records: {"Keys": _keys(3)}})
    assert answer["Responses"] == {records: []}
    assert answer["UnprocessedKeys"] == {records: {"Keys": _keys(3)}}


def _read_all(clients: AwsClients, table: str, keys: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """What a careful reader does (as ``ScaleTable._batch_get``): send the unprocessed keys again until none are
    left. The items' keys, and the keys left unprocessed by each call."""
    found: list[str] = []
    deferred: list[list[str]] = []
    request: dict[str, Any] = {table: {"Keys": keys, "ConsistentRead": True}}
    while request:
        answer = clients.dynamodb.batch_get_item(RequestItems=request)
        found += _pks(answer["Responses"].get(table, []))
        request = answer.get("UnprocessedKeys") or {}
        deferred.append(_pks(request.get(table, {}).get("Keys", [])))
    return sorted(found), deferred


def test_a_reader_that_sends_unprocessed_keys_again_reads_every_item_in_a_seeded_repeatable_way(
    local_aws: LocalAws, clients: AwsClients, records: str
) -> None:
    """DynamoDB API reference, BatchGetItem: "If DynamoDB returns any unprocessed items, you should retry the batch
    operation on those items":
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_BatchGetItem.html
    """
    # given half the calls leaving keys unprocessed, from seed 3
    local_aws.shim("dynamodb-unprocessed-keys", "set", share=0.5, seed=3)
    # when a reader reads twenty items, sending the unprocessed keys again, twice from the same seed
    first, first_deferred = _read_all(clients, records, _keys(*range(20)))
    local_aws.shim("dynamodb-unprocessed-keys", "set", share=0.5, seed=3)
    second, second_deferred = _read_all(clients, records, _keys(*range(20)))
    # then each read every item once, after a call left some of the keys (more than one, not all) unprocessed, and
    # both runs went alike
    assert first == second == sorted(f"RECORD#{n}" for n in range(20))
    assert len(first_deferred) > 1
    assert first_deferred == second_deferred
    assert any(1 < len(keys) < 20 for keys in first_deferred)
    # and with the share back at 0 no key is left unprocessed
    local_aws.shim("dynamodb-unprocessed-keys", "set", share=0)
    assert _read_all(clients, records, _keys(*range(20)))[1] == [[]]
    with pytest.raises(ValueError, match="share"):
        local_aws.shim("dynamodb-unprocessed-keys", "set", share=1.5)


# -- DynamoDB: global secondary indexes trail their table --------------------------------------------------------------


@pytest.fixture
def fleet_table(clients: AwsClients) -> str:
    """A table with the two index shapes bootstrap makes: a sparse KEYS_ONLY index of idle runners (pool, idle
    since) and a sparse ALL index of live records (kind, pk)."""
    name = f"lag-{uuid.uuid4().hex[:8]}"
    clients.dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "idle_pool", "AttributeType": "S"},
            {"AttributeName": "idle_since", "AttributeType": "N"},
            {"AttributeName": "live", "AttributeType": "S"},
        ],
        GlobalSecondaryIndexes=[
            {
                "IndexName": IDLE,
                "KeySchema": [
                    {"AttributeName": "idle_pool", "KeyType": "HASH"},
                    {"AttributeName": "idle_since", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "KEYS_ONLY"},
            },
            {
                "IndexName": LIVE,
                "KeySchema": [
                    {"AttributeName": "live", "KeyType": "HASH"},
                    {"AttributeName": "pk", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            },
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    return name


def _runner(table: str, n: int, *, since: int | None = None) -> dict[str, Any]:
    """A PutItem of an idle runner of pool docker: in both indexes."""
    item = {
        "pk": {"S": f"RUNNER#{n}"},
        "live": {"S": "runner"},
        "state": {"S": "idle"},
        "idle_pool": {"S": "docker"},
        "idle_since": {"N": str(since if since is not None else 100 + n)},
    }
    return {"TableName": table, "Item": item}


def _idle(clients: AwsClients, table: str, pool: str = "docker", **extra: Any) -> dict[str, Any]:
    return dict(
        clients.dynamodb.query(
            TableName=table,
            IndexName=IDLE,
            KeyConditionExpression="idle_pool = :pool",
            ExpressionAttributeValues={":pool": {"S": pool}},
            **extra,
        )
    )


def _live(clients: AwsClients, table: str) -> dict[str, dict[str, Any]]:
    answer = clients.dynamodb.query(
        TableName=table,
        IndexName=LIVE,
        KeyConditionExpression="#live = :kind",
        ExpressionAttributeNames={"#live": "live"},
        ExpressionAttributeValues={":kind": {"S": "runner"}},
    )
    assert answer["Count"] == answer["ScannedCount"] == len(answer["Items"])
    return {str(item["pk"]["S"]): item for item in answer["Items"]}


def _settled(local_aws: LocalAws, clients: AwsClients, table: str, *writes: dict[str, Any]) -> None:
    """Write items before the lag is on, so the index already shows them; then turn a 30 second lag on."""
    for write in writes:
        clients.dynamodb.put_item(**write)
    local_aws.shim("dynamodb-index-lag", "set", seconds=30)


def test_a_new_item_is_missing_from_the_index_until_the_lag_passes(
    local_aws: LocalAws, clients: AwsClients, fleet_table: str
) -> None:
    """DynamoDB developer guide, "DynamoDB read consistency": "All reads from GSIs and streams are eventually
    consistent", and such a read "may not reflect the results of a recently completed write operation"; the
    table itself reads it at once:
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.ReadConsistency.html
    """
    # given two idle runners the index shows, and a lag
    _settled(local_aws, clients, fleet_table, _runner(fleet_table, 1), _runner(fleet_table, 2))
    # when a third runner goes idle
    clients.dynamodb.put_item(**_runner(fleet_table, 3))
    # then the index does not show it yet, the counts agree with what it shows, and the table does show it
    idle = _idle(clients, fleet_table)
    assert _pks(idle["Items"]) == ["RUNNER#1", "RUNNER#2"]
    assert idle["Count"] == idle["ScannedCount"] == 2
    assert sorted(_live(clients, fleet_table)) == ["RUNNER#1", "RUNNER#2"]
    assert "Item" in clients.dynamodb.get_item(TableName=fleet_table, Key={"pk": {"S": "RUNNER#3"}})
    # and once the lag has passed the index shows it
    local_aws.shim("dynamodb-index-lag", "advance", seconds=31)
    assert _pks(_idle(clients, fleet_table)["Items"]) == ["RUNNER#1", "RUNNER#2", "RUNNER#3"]


def test_an_item_that_left_the_index_or_its_partition_is_still_answered_as_it_was(
    local_aws: LocalAws, clients: AwsClients, fleet_table: str
) -> None:
    """DynamoDB developer guide, "Using Global Secondary Indexes in DynamoDB" (the table's writes reach the index
    asynchronously; a sparse index holds only items with its key attributes; a KEYS_ONLY index holds the table and
    index keys), and "DynamoDB read consistency":
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/GSI.html
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.ReadConsistency.html
    """
    # given three idle runners the index shows, and a lag
    _settled(local_aws, clients, fleet_table, *(_runner(fleet_table, n) for n in (1, 2, 3)))
    # when one is claimed (it leaves the idle index) and one moves to another pool
    clients.dynamodb.update_item(
        TableName=fleet_table,
        Key={"pk": {"S": "RUNNER#1"}},
        UpdateExpression="SET #state = :busy REMOVE idle_pool, idle_since",
        ExpressionAttributeNames={"#state": "state"},
        ExpressionAttributeValues={":busy": {"S": "busy"}},
    )
    clients.dynamodb.update_item(
        TableName=fleet_table,
        Key={"pk": {"S": "RUNNER#2"}},
        UpdateExpression="SET idle_pool = :arm",
        ExpressionAttributeValues={":arm": {"S": "arm"}},
    )
    # then the index still answers both in the old pool, with the index's keys only, and none in the new one
    idle = _idle(clients, fleet_table)
    assert idle["Items"] == [
        {"pk": {"S": f"RUNNER#{n}"}, "idle_pool": {"S": "docker"}, "idle_since": {"N": str(100 + n)}} for n in (1, 2, 3)
    ]
    assert _idle(clients, fleet_table, "arm")["Items"] == []
    # and once the lag has passed it answers the table as it is
    local_aws.shim("dynamodb-index-lag", "advance", seconds=31)
    assert _pks(_idle(clients, fleet_table)["Items"]) == ["RUNNER#3"]
    assert _pks(_idle(clients, fleet_table, "arm")["Items"]) == ["RUNNER#2"]


def test_an_updated_or_deleted_item_is_answered_as_it_was_by_an_index_of_all_attributes(
    local_aws: LocalAws, clients: AwsClients, fleet_table: str
) -> None:
    """DynamoDB developer guide, "DynamoDB read consistency" (an index read may not reflect a recent write, an
    update or a delete alike) and "Using Global Secondary Indexes in DynamoDB" (an ALL index projects every
    attribute):
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.ReadConsistency.html
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/GSI.html
    """
    _settled(local_aws, clients, fleet_table, *(_runner(fleet_table, n) for n in (1, 2)))
    clients.dynamodb.update_item(
        TableName=fleet_table,
        Key={"pk": {"S": "RUNNER#1"}},
        UpdateExpression="SET #state = :busy, note = :note",
        ExpressionAttributeNames={"#state": "state"},
        ExpressionAttributeValues={":busy": {"S": "busy"}, ":note": {"S": "claimed"}},
    )
    clients.dynamodb.delete_item(TableName=fleet_table, Key={"pk": {"S": "RUNNER#2"}})
    live = _live(clients, fleet_table)
    assert live["RUNNER#1"] == _runner(fleet_table, 1)["Item"]
    assert live["RUNNER#2"] == _runner(fleet_table, 2)["Item"]
    local_aws.shim("dynamodb-index-lag", "advance", seconds=31)
    live = _live(clients, fleet_table)
    assert sorted(live) == ["RUNNER#1"]
    assert (live["RUNNER#1"]["state"], live["RUNNER#1"]["note"]) == ({"S": "busy"}, {"S": "claimed"})


def test_a_count_with_a_limit_counts_the_index_as_it_lags(
    local_aws: LocalAws, clients: AwsClients, fleet_table: str
) -> None:
    """DynamoDB API reference, Query: ``Select=COUNT`` "returns the number of matching items, rather than the
    matching items themselves", ``Limit`` bounds the items evaluated and a page cut there has a
    ``LastEvaluatedKey``; the index being eventually consistent, the count is of what it shows:
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_Query.html
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.ReadConsistency.html
    """
    # given three idle runners the index shows, and a lag
    _settled(local_aws, clients, fleet_table, *(_runner(fleet_table, n) for n in (1, 2, 3)))
    # when two runners go idle first in the index's order, and one is claimed
    for n in (4, 5):
        clients.dynamodb.put_item(**_runner(fleet_table, n, since=n))
    clients.dynamodb.delete_item(TableName=fleet_table, Key={"pk": {"S": "RUNNER#3"}})
    # then a count sees the three it showed, even when limited to three; a smaller limit cuts the page
    assert _idle(clients, fleet_table, Select="COUNT")["Count"] == 3
    limited = _idle(clients, fleet_table, Select="COUNT", Limit=3)
    assert (limited["Count"], limited["ScannedCount"], "Items" in limited) == (3, 3, False)
    cut = _idle(clients, fleet_table, Select="COUNT", Limit=2)
    assert cut["Count"] == 2
    assert cut["LastEvaluatedKey"] == {
        "pk": {"S": "RUNNER#2"},
        "idle_pool": {"S": "docker"},
        "idle_since": {"N": "102"},
    }
    # and once the lag has passed it counts the table as it is
    local_aws.shim("dynamodb-index-lag", "advance", seconds=31)
    assert _idle(clients, fleet_table, Select="COUNT", Limit=10)["Count"] == 4


def test_pages_of_a_lagging_index_hold_every_item_it_shows_once(
    local_aws: LocalAws, clients: AwsClients, fleet_table: str
) -> None:
    """DynamoDB API reference, Query: each page holds at most ``Limit`` items and its ``LastEvaluatedKey`` starts
    the next one; together the pages are the index as it shows:
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_Query.html
    """
    # given six live runners the index shows, and a lag
    _settled(local_aws, clients, fleet_table, *(_runner(fleet_table, n) for n in range(1, 7)))
    # when writes change the table: two new runners, two deletions, an update
    for n in (0, 9):
        clients.dynamodb.put_item(**_runner(fleet_table, n))
    for n in (2, 5):
        clients.dynamodb.delete_item(TableName=fleet_table, Key={"pk": {"S": f"RUNNER#{n}"}})
    clients.dynamodb.update_item(
        TableName=fleet_table,
        Key={"pk": {"S": "RUNNER#3"}},
        UpdateExpression="REMOVE live",
    )
    # then a paginated read in pages of two answers the six as the index showed them, each once, in order
    pages = clients.dynamodb.get_paginator("query").paginate(
        TableName=fleet_table,
        IndexName=LIVE,
        KeyConditionExpression="live = :kind",
        ExpressionAttributeValues={":kind": {"S": "runner"}},
        PaginationConfig={"PageSize": 2},
    )
    seen: list[str] = []
    for page in pages:
        assert page["Count"] == len(page["Items"]) <= 2
        seen += [str(item["pk"]["S"]) for item in page["Items"]]
    assert seen == [f"RUNNER#{n}" for n in range(1, 7)]


def test_writes_in_batches_and_transactions_reach_the_index_late_too(
    local_aws: LocalAws, clients: AwsClients, fleet_table: str
) -> None:
    """DynamoDB developer guide, "DynamoDB read consistency": every write reaches a GSI asynchronously, whichever
    call made it (BatchWriteItem, TransactWriteItems):
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.ReadConsistency.html
    """
    _settled(local_aws, clients, fleet_table, _runner(fleet_table, 1), _runner(fleet_table, 2))
    clients.dynamodb.batch_write_item(
        RequestItems={fleet_table: [{"PutRequest": {"Item": _runner(fleet_table, 3)["Item"]}}]}
    )
    clients.dynamodb.transact_write_items(
        TransactItems=[
            {
                "Update": {
                    "TableName": fleet_table,
                    "Key": {"pk": {"S": "RUNNER#1"}},
                    "UpdateExpression": "REMOVE idle_pool, idle_since",
                }
            },
            {
                "ConditionCheck": {
                    "TableName": fleet_table,
                    "Key": {"pk": {"S": "RUNNER#2"}},
                    "ConditionExpression": "attribute_exists(pk)",
                }
            },
        ]
    )
    assert _pks(_idle(clients, fleet_table)["Items"]) == ["RUNNER#1", "RUNNER#2"]
    assert local_aws.shim("dynamodb-index-lag", "status")["young_items"] == 2
    local_aws.shim("dynamodb-index-lag", "advance", seconds=31)
    assert _pks(_idle(clients, fleet_table)["Items"]) == ["RUNNER#2", "RUNNER#3"]


def test_a_strongly_consistent_read_of_a_global_index_is_refused(
    local_aws: LocalAws, clients: AwsClients, fleet_table: str
) -> None:
    """DynamoDB API reference, Query, ``ConsistentRead``: "If you query a global secondary index with
    ConsistentRead set to true, you will receive a ValidationException" (moto does; the lag leaves it to moto):
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_Query.html
    """
    _settled(local_aws, clients, fleet_table, _runner(fleet_table, 1))
    clients.dynamodb.put_item(**_runner(fleet_table, 2))
    with pytest.raises(ClientError) as refused:
        _idle(clients, fleet_table, ConsistentRead=True)
    assert refused.value.response["Error"]["Code"] == "ValidationException"


def test_the_index_does_not_lag_by_default_nor_after_a_reset(
    local_aws: LocalAws, clients: AwsClients, fleet_table: str
) -> None:
    """The rule is off until configured, and ``POST /moto-api/reset`` puts it back to off."""
    clients.dynamodb.put_item(**_runner(fleet_table, 1))
    assert _pks(_idle(clients, fleet_table)["Items"]) == ["RUNNER#1"]
    local_aws.shim("dynamodb-index-lag", "set", seconds=30)
    local_aws.reset()
    assert local_aws.shim("dynamodb-index-lag", "status") == {"seconds": 0.0, "young_items": 0, "rewritten": 0}
    with pytest.raises(ValueError, match="seconds"):
        local_aws.shim("dynamodb-index-lag", "set", seconds=-0.5)
