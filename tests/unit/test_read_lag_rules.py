"""The AWS shim's read-lag rules, on their pure parts and a clock of their own: where a lagging index places an
item's former image in a page, a DynamoDB key's identity, and DescribeInstances leaving young instances out."""

from __future__ import annotations

import io
from typing import Any

from fleetctl.sandbox.aws_rules.dynamodb_index_lag import IndexShape, lagged_page
from fleetctl.sandbox.aws_rules.ec2_describe_lag import DescribeInstancesLag
from fleetctl.sandbox.aws_rules.support import key_identity
from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, parse_request

IDLE = IndexShape(table_keys=("pk",), hash_keys=("idle_pool",), range_keys=("idle_since",), projection="KEYS_ONLY")
EC2_NAMESPACE = "http://ec2.amazonaws.com/doc/2016-11-15/"


def _runner(n: int, since: int, **extra: Any) -> dict[str, Any]:
    return {"pk": {"S": f"RUNNER#{n}"}, "idle_pool": {"S": "docker"}, "idle_since": {"N": str(since)}, **extra}


def _id(n: int) -> Any:
    return key_identity({"pk": {"S": f"RUNNER#{n}"}}, ["pk"])


def _page(answer: dict[str, Any], lagged: dict[Any, Any], **where: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"forward_order": True, "exclusive_start": None, "limit": None, "count_only": False}
    options.update(where)
    page = lagged_page(IDLE, answer, lagged, partition={"idle_pool": {"S": "docker"}}, **options)
    assert page is not None
    return page


def test_a_former_image_takes_its_place_in_a_reverse_page_and_the_limit_cuts_after_it() -> None:
    """DynamoDB API reference, Query: ``ScanIndexForward=false`` reads the index in descending order, and a page
    cut at ``Limit`` ends with a ``LastEvaluatedKey`` of its last item:
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_Query.html
    """
    # given moto's answer, descending, holding a runner written just now, and a runner the index still holds
    answer = {"Items": [_runner(5, 105), _runner(3, 103), _runner(1, 101)], "Count": 3, "ScannedCount": 3}
    lagged = {_id(5): None, _id(2): _runner(2, 102, state={"S": "idle"})}
    # when the page is read as the index shows it, two items long
    page = _page(answer, lagged, forward_order=False, limit=2)
    # then the new runner is gone, the former one is in its place with the index's keys only, and the page is cut
    assert page["Items"] == [_runner(3, 103), _runner(2, 102)]
    assert (page["Count"], page["ScannedCount"]) == (2, 2)
    assert page["LastEvaluatedKey"] == _runner(2, 102)


def test_a_former_image_is_placed_only_in_the_page_it_belongs_to() -> None:
    """DynamoDB API reference, Query: a page holds the items after ``ExclusiveStartKey`` up to its own
    ``LastEvaluatedKey``; the next page starts there:
    https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_Query.html
    """
    answer = {"Items": [_runner(3, 103)], "Count": 1, "ScannedCount": 1, "LastEvaluatedKey": _runner(3, 103)}
    lagged = {_id(0): _runner(0, 100), _id(2): _runner(2, 102), _id(4): _runner(4, 104)}
    page = _page(answer, lagged, exclusive_start=_runner(1, 101), count_only=True)
    assert page == {"Count": 2, "ScannedCount": 2, "LastEvaluatedKey": _runner(3, 103)}


def test_a_former_image_of_another_partition_or_outside_the_index_is_not_answered() -> None:
    """DynamoDB developer guide, "Using Global Secondary Indexes in DynamoDB": a sparse index holds only items with
    its key attributes, and a Query reads one partition:
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/GSI.html
    """
    elsewhere = {**_runner(2, 102), "idle_pool": {"S": "arm"}}
    outside = {"pk": {"S": "RUNNER#4"}, "state": {"S": "busy"}}
    page = _page({"Items": [_runner(1, 101)], "Count": 1, "ScannedCount": 1}, {_id(2): elsewhere, _id(4): outside})
    assert page["Items"] == [_runner(1, 101)]


def test_a_key_counts_a_number_by_its_value_and_needs_every_attribute() -> None:
    """DynamoDB developer guide, "Supported data types": a number key is a number, ``1`` and ``1.0`` alike:
    https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.NamingRulesDataTypes.html
    """
    assert key_identity({"n": {"N": "1.0"}}, ["n"]) == key_identity({"n": {"N": "1"}}, ["n"])
    assert key_identity({"n": {"S": "1"}}, ["n"]) != key_identity({"n": {"N": "1"}}, ["n"])
    assert key_identity({"pk": {"S": "a"}}, ["pk", "sk"]) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ec2(action: str) -> AwsRequest:
    body = f"Action={action}&Version=2016-11-15".encode()
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/",
        "CONTENT_LENGTH": str(len(body)),
        "CONTENT_TYPE": "application/x-www-form-urlencoded; charset=utf-8",
        "wsgi.input": io.BytesIO(body),
        "HTTP_AUTHORIZATION": "AWS4-HMAC-SHA256 Credential=t/20261129/us-east-1/ec2/aws4_request, S=h",
    }
    return parse_request(environ, body)


def _answer(xml: str) -> AwsResponse:
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n{xml}'.encode()
    return AwsResponse(200, [("Content-Type", "text/xml"), ("Content-Length", str(len(body)))], body)


def _instances(*ids: str) -> str:
    return "".join(f"<item><instanceId>{i}</instanceId><groupSet><item/></groupSet></item>" for i in ids)


DESCRIBED = _answer(
    f'<DescribeInstancesResponse xmlns="{EC2_NAMESPACE}"><reservationSet>'
    f"<item><reservationId>r-1</reservationId><instancesSet>{_instances('i-old', 'i-new')}</instancesSet></item>"
    f"<item><reservationId>r-2</reservationId><instancesSet>{_instances('i-fleet')}</instancesSet></item>"
    "</reservationSet></DescribeInstancesResponse>"
)


def _reservations(response: AwsResponse) -> dict[str, list[str]]:
    from xml.etree import ElementTree

    tag = f"{{{EC2_NAMESPACE}}}"
    root = ElementTree.fromstring(response.body)  # noqa: S314 - the rule's own answer
    return {
        str(item.findtext(f"{tag}reservationId")): [
            str(instance.findtext(f"{tag}instanceId")) for instance in item.findall(f"{tag}instancesSet/{tag}item")
        ]
        for item in root.findall(f"{tag}reservationSet/{tag}item")
    }


def test_describe_instances_leaves_out_young_instances_and_their_emptied_reservations_until_its_clock_passes() -> None:
    """ "Eventual consistency in the Amazon EC2 API": a launched instance reaches DescribeInstances after a while:
    https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html
    """
    # given a 5 second lag, and one instance launched by RunInstances, one by CreateFleet
    clock = Clock()
    rule = DescribeInstancesLag(seconds=5, clock=clock)
    run = _answer(
        f'<RunInstancesResponse xmlns="{EC2_NAMESPACE}"><instancesSet>{_instances("i-new")}</instancesSet>'
        "</RunInstancesResponse>"
    )
    fleet = _answer(
        f'<CreateFleetResponse xmlns="{EC2_NAMESPACE}"><fleetInstanceSet><item><instanceIds><item>i-fleet</item>'
        "</instanceIds></item></fleetInstanceSet></CreateFleetResponse>"
    )
    rule.handle(_ec2("RunInstances"), lambda _: run)
    rule.handle(_ec2("CreateFleet"), lambda _: fleet)
    # when DescribeInstances answers all three, 4.9 seconds on
    clock.now += 4.9
    early = rule.handle(_ec2("DescribeInstances"), lambda _: DESCRIBED)
    # then the reservation keeps its older instance only, and the fleet's reservation, left empty, is gone
    assert _reservations(early) == {"r-1": ["i-old"]}
    assert early.header("Content-Length") == str(len(early.body))
    # and past 5 seconds, everything is there
    clock.now += 0.2
    assert _reservations(rule.handle(_ec2("DescribeInstances"), lambda _: DESCRIBED)) == {
        "r-1": ["i-old", "i-new"],
        "r-2": ["i-fleet"],
    }
